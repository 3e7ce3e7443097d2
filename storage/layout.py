"""Where every output of a run lives: the storage contract of DESIGN.md in one place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def catalog_path(root: Path) -> Path:
    return Path(root) / "catalog.duckdb"


def run_dir_holding(path: Path) -> Path | None:
    """The `<root>/runs/<run_id>` directory that `path` lies in, if any."""
    return next((d for d in Path(path).resolve().parents if d.parent.name == "runs"), None)


@dataclass(frozen=True)
class RunPaths:
    root: Path
    run_id: str

    @property
    def catalog(self) -> Path:
        return catalog_path(self.root)

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.run_id

    def split_dir(self, split: str) -> Path:  # pool, validation, test
        return self.run_dir / split

    @property
    def score_cache(self) -> Path:  # shared by all runs under this root
        return self.root / "cache" / "scores"

    @property
    def model_dir(self) -> Path:  # the base model with the run's model.chat_template (tasks/chat_template.py)
        return self.run_dir / "model"

    @property
    def reference_adapter(self) -> Path:  # the DavIR reference: base + LoRA tuned on the validation set
        return self.run_dir / "reference" / "adapter"

    @property
    def reference_train_set(self) -> Path:
        return self.run_dir / "reference" / "train_set.parquet"

    def sppl_exemplars(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "sppl_exemplars.parquet"

    def iter_dir(self, iteration: int) -> Path:
        return self.run_dir / f"iter-{iteration:03d}"

    def scores_dir(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "scores"

    def weights(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "weights.parquet"

    def refine_dir(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "refine"

    def generations_dir(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "generations"

    def generation_weights_dir(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "generation_weights"

    def train_set(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "train_set.parquet"

    def adapter(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "adapter"

    def evaluation(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "evaluation.parquet"
