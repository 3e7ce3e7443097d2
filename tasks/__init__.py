"""One module per stage of the curation loop; each exposes plain typed functions."""
