"""python benchmarks/scoring/run.py --samples 1000 --naive-samples 200 --out benchmarks/scoring/results.json

Scoring benchmark: the batched response-NLL scorer against a naive per-sample loop, and the scoring flow's
overhead outside the model forward. Then `python benchmarks/scoring/table.py benchmarks/scoring/results.json`
prints the Markdown tables.

Smoke test (about 3 minutes for all variants on a busy 2-core machine; --samples 24 took about 5):

    python benchmarks/scoring/run.py --samples 8 --out /tmp/scoring-smoke.json

Data: the first N rows (file order) of ../shared/data/alpaca_subset.json; prompt = instruction, plus
"\\n\\n" + input when input is non-empty (`tasks.row_formats.alpaca_prompt`), both sides stripped as ingest does;
inputs are `prompt_ids + response_ids` from `tasks.tokens.encode_pairs` (chat template, eos appended),
max_seq_len 512. Model: the default model (SmolLM2-135M-Instruct) from `tasks.models.load_model`.

Variants, each in its own fresh subprocess (`run.py --worker VARIANT ...`), so `peak_rss_mb` is that
variant's own peak resident set (ru_maxrss; model weights and Python included, see `rss_before_scoring_mb`):

  naive_fp32            batch 1, `model(input_ids).logits` (full logits), fp32 log_softmax, mean NLL over the
                        response tokens. The reference every other variant's losses are compared to.
  batched_fp32          `tasks.nll.response_nll` (length buckets of <= --batch-tokens padded tokens, LM head
                        only at response positions, in chunks), fp32 model.
  batched_bf16          the same with the bf16 model (loss still computed in fp32).
  full_logsoftmax_fp32  the same batches as batched_fp32, but logits for the whole padded batch and a
                        full-vocabulary log_softmax (B x T x V), then gather + mask: the memory/time comparison
                        for the chunked response-only LM head.
  flow_overhead         the real scoring stage end to end: write the rows to a temp JSONL, `ingest_split` into
                        pool shards (--shard-rows), then one Prefect @flow calling `flows.stages.score_task` per
                        shard and recording artifacts/lineage in a `storage.catalog.Catalog` as flows/curate.py
                        does; temp PREFECT_HOME, Prefect's temporary local server. Time inside the model forward
                        is measured by wrapping `tasks.nll.batch_nll` (response_nll looks it up as a module
                        global); overhead share = 1 - forward / total, with and without the one-off model load
                        and Prefect server start. Uses --dtype (default bf16).

tokens/s counts real (unpadded) prompt + response tokens of the scorable samples, divided by the scoring wall
time (model load, tokenization and one warm-up forward excluded; they are reported separately). For
flow_overhead, tokens/s is end to end (total wall). Agreement with naive_fp32: max/mean abs diff of the
per-sample losses (the criterion for fp32 variants) and Spearman rank correlation (the criterion for bf16).
"""
from __future__ import annotations

import argparse
import atexit
import datetime as dt
import inspect
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_subset.json"
DIRECT_VARIANTS = ("naive_fp32", "batched_fp32", "batched_bf16", "full_logsoftmax_fp32")
VARIANTS = DIRECT_VARIANTS + ("flow_overhead",)
VARIANT_DTYPE = {"naive_fp32": "fp32", "batched_fp32": "fp32", "batched_bf16": "bf16", "full_logsoftmax_fp32": "fp32"}
REFERENCE = "naive_fp32"
GOAL_SPEEDUP = 2.5
GOAL_OVERHEAD = 0.10


# ----------------------------------------------------------------------------------------------------- data

def load_pairs(path: Path, n: int) -> list[tuple[str, str]]:
    """(prompt, response) of the first n Alpaca rows, built and stripped as tasks.ingest does."""
    from tasks.row_formats import alpaca_prompt

    rows = json.loads(Path(path).read_text())
    if n > len(rows):
        raise SystemExit(f"--samples {n} > {len(rows)} rows in {path}")
    pairs = []
    for row in rows[:n]:
        prompt = alpaca_prompt(row["instruction"], row.get("input") or "")
        pairs.append((prompt.strip(), row["output"].strip()))
    return pairs


def rss_mb() -> float:
    """Current resident set of this process (VmRSS), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def token_counts(encoded) -> dict:
    scorable = [e for e in encoded if e.response_ids]
    return {
        "samples": len(encoded),
        "scorable_samples": len(scorable),
        "truncated_samples": sum(e.truncated for e in encoded),
        "response_tokens": sum(len(e.response_ids) for e in scorable),
        "prompt_tokens": sum(len(e.prompt_ids) for e in scorable),
        "total_tokens": sum(e.length for e in scorable),
    }


# --------------------------------------------------------------------------------------- scoring variants

def naive_losses(model, encoded):
    """Batch 1, full logits, fp32 log_softmax over the whole vocabulary, mean NLL over response tokens."""
    import numpy as np
    import torch

    losses = np.full(len(encoded), math.nan, dtype=np.float32)
    with torch.inference_mode():
        for i, e in enumerate(encoded):
            if not e.response_ids:
                continue
            ids = torch.tensor([e.prompt_ids + e.response_ids])
            logits = model(ids).logits  # (1, T, V)
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            p = len(e.prompt_ids)
            targets = ids[0, p:]
            token_logp = logp[p - 1: -1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            losses[i] = -token_logp.mean().item()
    return losses


def full_logsoftmax_losses(model, encoded, pad_id, batch_tokens):
    """Same batches as tasks.nll.response_nll, but logits + log_softmax over the full vocab for the whole batch."""
    import numpy as np
    import torch

    from tasks.tokens import collate, length_batches

    losses = np.full(len(encoded), math.nan, dtype=np.float32)
    scorable = [i for i, e in enumerate(encoded) if e.response_ids]
    with torch.inference_mode():
        for batch in length_batches([encoded[i].length for i in scorable], batch_tokens):
            index = [scorable[j] for j in batch]
            input_ids, attention, loss_mask = collate([encoded[i] for i in index], pad_id)
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()  # (B, T, V)
            logp = torch.log_softmax(logits, dim=-1)  # a second (B, T, V) fp32 tensor
            token_logp = logp[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            mask = loss_mask[:, 1:]
            sums = -torch.where(mask, token_logp, torch.zeros_like(token_logp)).sum(dim=1)
            n = mask.sum(dim=1)
            losses[index] = (sums / n.clamp(min=1)).numpy()
    return losses


def padded_tokens(encoded, batch_tokens) -> int:
    from tasks.tokens import length_batches

    lengths = [e.length for e in encoded if e.response_ids]
    return sum(max(lengths[i] for i in b) * len(b) for b in length_batches(lengths, batch_tokens))


def worker_direct(variant: str, args) -> dict:
    import numpy as np
    import torch

    from tasks.models import load_model
    from tasks.nll import response_nll
    from tasks.tokens import encode_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = VARIANT_DTYPE[variant]
    pairs = load_pairs(args.data, args.samples)

    t = time.perf_counter()
    model, tokenizer = load_model("default", dtype)
    model.eval()
    load_s = time.perf_counter() - t

    t = time.perf_counter()
    encoded = encode_pairs(tokenizer, [p for p, _ in pairs], [r for _, r in pairs], args.max_seq_len)
    tokenize_s = time.perf_counter() - t
    pad_id = tokenizer.pad_token_id

    def score(items):
        if variant == "naive_fp32":
            return naive_losses(model, items)
        if variant == "full_logsoftmax_fp32":
            return full_logsoftmax_losses(model, items, pad_id, args.batch_tokens)
        return response_nll(model, items, pad_id, args.batch_tokens)[0]

    # one short warm-up call (one-off kernel/allocator set-up), not timed with the rest
    shortest = min((e for e in encoded if e.response_ids), key=lambda e: e.length)
    t = time.perf_counter()
    score([shortest])
    warmup_s = time.perf_counter() - t

    rss_before = rss_mb()
    load_before = os.getloadavg()
    t = time.perf_counter()
    losses = score(encoded)
    wall_s = time.perf_counter() - t

    counts = token_counts(encoded)
    padded = counts["total_tokens"] if variant == "naive_fp32" else padded_tokens(encoded, args.batch_tokens)
    return {
        "variant": variant,
        "dtype": dtype,
        **counts,
        "padded_tokens": padded,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": counts["total_tokens"] / wall_s,
        "response_tokens_per_s": counts["response_tokens"] / wall_s,
        "samples_per_s": counts["scorable_samples"] / wall_s,
        "model_load_s": round(load_s, 3),
        "tokenize_s": round(tokenize_s, 3),
        "warmup_s": round(warmup_s, 3),
        "rss_before_scoring_mb": round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "losses": [None if not math.isfinite(x) else float(x) for x in np.asarray(losses, dtype=np.float64)],
    }


# ---------------------------------------------------------------------------------------- flow overhead

class Timer:
    """Accumulates wall seconds and calls per component; wraps functions in place."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1

    def wrap(self, key: str, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.add(key, time.perf_counter() - t)
        timed.__wrapped__ = fn
        return timed


def worker_flow(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-scoring-flow-"))
    # removed at exit, after Prefect's own exit handler (registered later, so run earlier) stops its server
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    # Prefect reads its settings at import: a private home, no telemetry (these machines reach no such host)
    os.environ["PREFECT_HOME"] = str(tmp / "prefect_home")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.pop("PREFECT_API_URL", None)  # always the temporary local server, as a plain `curate run`

    t = time.perf_counter()
    import torch
    from prefect import flow
    from prefect.runtime import flow_run
    from prefect.server.api import server as prefect_server
    from prefect.task_runners import ThreadPoolTaskRunner

    import tasks.nll
    import tasks.score
    from flows.config import SourceConfig
    from flows.stages import score_task
    from storage.catalog import Catalog
    from storage.shards import read_manifest, read_shard
    from tasks.ingest import ingest_split, make_id
    imports_s = time.perf_counter() - t

    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer()
    # instrument, without changing behaviour; tasks.score imported these names into its own namespace
    tasks.nll.batch_nll = timer.wrap("forward", tasks.nll.batch_nll)
    tasks.score.response_nll = timer.wrap("response_nll", tasks.score.response_nll)
    tasks.score.load_model = timer.wrap("model_load", tasks.score.load_model)
    for name in ("tokenize_texts", "tokenize_responses", "pair"):  # building model inputs, once per sample
        setattr(tasks.score, name, timer.wrap("tokenize", getattr(tasks.score, name)))
    tasks.score.read_shard = timer.wrap("read_shard", tasks.score.read_shard)
    tasks.score.write_shard = timer.wrap("write_shard", tasks.score.write_shard)
    tasks.score.model_fingerprint = timer.wrap("model_fingerprint", tasks.score.model_fingerprint)
    server_cls = prefect_server.SubprocessASGIServer
    server_cls.start = timer.wrap("prefect_server_start", server_cls.start)

    pairs = load_pairs(args.data, args.samples)
    rows = json.loads(Path(args.data).read_text())[: args.samples]  # the original Alpaca rows; ingest builds them
    jsonl = tmp / "input" / "alpaca_first_n.jsonl"
    jsonl.parent.mkdir(parents=True)
    t = time.perf_counter()
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_input_s = time.perf_counter() - t

    root = tmp / "root"
    run_id = "bench-scoring"
    scores_dir = root / "runs" / run_id / "iter-001" / "scores"
    catalog_path = root / "catalog.duckdb"
    marks: dict[str, float] = {}

    # score_task's signature: (..., batch_tokens, iteration) up to commit ff6a5c6; later (..., iteration,
    # cfg: ScoreConfig, reference_adapter, exemplars_path, cache_dir); from the ModelSpec change on, keywords after
    # the shard and its output. Loss only; a cold score cache under the temp root, as a first run of `curate run`
    # has (its write is part of the measured time).
    task_params = list(inspect.signature(score_task.fn).parameters)
    if "model" in task_params:
        from flows.config import ScoreConfig
        from tasks.models import ModelSpec

        score_cfg = ScoreConfig(metrics=["loss"], batch_tokens=args.batch_tokens)
        score_api = "ModelSpec"

        def score_task_args(shard, out):
            return (shard, out), dict(model=ModelSpec("default", args.dtype, max_seq_len=args.max_seq_len),
                                      iteration=1, cfg=score_cfg, cache_dir=root / "cache" / "scores")
    elif "cfg" in task_params:
        from flows.config import ScoreConfig

        score_cfg = ScoreConfig(metrics=["loss"], batch_tokens=args.batch_tokens)
        score_api = "ScoreConfig"

        def score_task_args(shard, out):
            return (shard, out, "default", args.dtype, None, args.max_seq_len, 1, score_cfg, None, None,
                    root / "cache" / "scores"), {}
    else:
        score_api = "batch_tokens"

        def score_task_args(shard, out):
            return (shard, out, "default", args.dtype, None, args.max_seq_len, args.batch_tokens, 1), {}

    @flow(name="bench-scoring", flow_run_name=f"curate-{run_id}-iter-001",
          task_runner=ThreadPoolTaskRunner(max_workers=1))
    def score_flow(shards: list[str]) -> list[str]:
        marks["flow_entered"] = time.perf_counter()
        fr_id = str(flow_run.id)
        t0 = time.perf_counter()
        catalog = Catalog(catalog_path)
        catalog.upsert_run(run_id, {"benchmark": "scoring"}, "", str(root), "running", fr_id)
        catalog.upsert_iteration(run_id, 1, "default", None, "running", fr_id)
        for shard in shards:  # ingest's artifacts, as the curate flow records them
            catalog.record_artifact(run_id, 0, "pool", shard, read_manifest(Path(shard)), flow_run_id=fr_id)
        timer.add("catalog", time.perf_counter() - t0)
        outs = []
        for shard in shards:
            out = scores_dir / Path(shard).name
            t0 = time.perf_counter()
            positional, keywords = score_task_args(shard, out)
            score_task.with_options(task_run_name=f"score-{run_id}-it1-{Path(shard).stem}")(*positional, **keywords)
            timer.add("score_task_calls", time.perf_counter() - t0)
            outs.append(str(out))
            t0 = time.perf_counter()  # as flows/curate.py: one artifact and one lineage edge per shard
            catalog.record_artifact(run_id, 1, "scores", str(out), read_manifest(out), flow_run_id=fr_id)
            catalog.record_lineage(run_id, shard, str(out), "scored")
            timer.add("catalog", time.perf_counter() - t0)
        t0 = time.perf_counter()
        catalog.upsert_iteration(run_id, 1, "default", None, "completed", fr_id)
        catalog.set_run_status(run_id, "completed")
        timer.add("catalog", time.perf_counter() - t0)
        marks["flow_body_done"] = time.perf_counter()
        return outs

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    stats = ingest_split([SourceConfig(path=str(jsonl), source="alpaca")], root / "runs" / run_id / "pool", "pool",
                         max_chars=16000, shard_rows=args.shard_rows)
    timer.add("ingest", time.perf_counter() - t_start)
    t_flow = time.perf_counter()
    outs = score_flow(stats.shards)
    t_end = time.perf_counter()
    total_s = t_end - t_start

    # ---- not timed: losses for the agreement check, keyed back to input rows through the sample ids
    loss_by_id = {}
    for out in outs:
        table = read_shard(Path(out), columns=["sample_id", "metric", "value", "n_tokens"])
        for sid, metric, value in zip(table["sample_id"].to_pylist(), table["metric"].to_pylist(),
                                      table["value"].to_pylist()):
            if metric == "loss":
                loss_by_id[sid] = value
    losses = [loss_by_id.get(make_id(p, r)) for p, r in pairs]
    losses = [None if v is None or not math.isfinite(v) else float(v) for v in losses]
    from tasks.models import load_model
    from tasks.tokens import encode_pairs
    _, tokenizer = load_model("default", args.dtype)  # cached: the flow's own model
    encoded = encode_pairs(tokenizer, [p for p, _ in pairs], [r for _, r in pairs], args.max_seq_len)
    counts = token_counts(encoded)

    s = timer.seconds
    forward = s.get("forward", 0.0)
    model_load = s.get("model_load", 0.0) if timer.calls.get("model_load") else 0.0
    server_start = s.get("prefect_server_start", 0.0)
    flow_entry = marks["flow_entered"] - t_flow
    flow_exit = t_end - marks["flow_body_done"]
    # model_load's first call does the loading; later shards hit load_model's per-process cache
    components = {
        "ingest_s": s.get("ingest", 0.0),
        "prefect_server_start_s": server_start,
        "prefect_flow_start_other_s": flow_entry - server_start,  # flow-run creation etc. (server start excluded)
        "model_load_s": model_load,
        "read_shard_s": s.get("read_shard", 0.0),
        "tokenize_s": s.get("tokenize", 0.0),
        "forward_s": forward,
        "batching_collate_s": s.get("response_nll", 0.0) - forward,  # response_nll outside batch_nll
        "write_shard_s": s.get("write_shard", 0.0),
        "model_fingerprint_s": s.get("model_fingerprint", 0.0),
        "catalog_s": s.get("catalog", 0.0),
        "prefect_flow_exit_s": flow_exit,
    }
    known = sum(components.values())
    components["other_s"] = total_s - known  # Prefect task orchestration, logging, progress bars, ...
    components = {k: round(v, 3) for k, v in components.items()}
    one_off = model_load + server_start
    steady = total_s - one_off
    write_catalog = s.get("write_shard", 0.0) + s.get("catalog", 0.0)
    return {
        "variant": "flow_overhead",
        "dtype": args.dtype,
        **counts,
        "rows_kept": stats.rows_kept,
        "rows_quarantined": stats.rows_quarantined,
        "shards": len(stats.shards),
        "shard_rows": args.shard_rows,
        "score_task_api": score_api,
        "wall_s": round(total_s, 3),
        "tokens_per_s": counts["total_tokens"] / total_s,
        "tokens_per_s_excl_one_off": counts["total_tokens"] / steady,
        "tokens_per_s_forward_only": counts["total_tokens"] / forward if forward else None,
        "forward_s": round(forward, 3),
        "forward_calls": timer.calls.get("forward", 0),
        "overhead_share": 1 - forward / total_s,
        "overhead_share_excl_one_off": 1 - forward / steady,
        "one_off_s": round(one_off, 3),
        "write_and_catalog_s": round(write_catalog, 3),
        "components": components,
        "not_in_total": {"imports_s": round(imports_s, 3), "write_input_jsonl_s": round(write_input_s, 3),
                         "prefect_server_shutdown": "at process exit, not measured"},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "children_peak_rss_mb": round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1),
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "losses": losses,
    }


# ----------------------------------------------------------------------------------------------- parent

def spearman(a, b) -> float:
    import numpy as np

    def ranks(x):
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x), dtype=np.float64)
        r[order] = np.arange(len(x), dtype=np.float64)
        xs = x[order]  # average ranks over ties
        i = 0
        while i < len(xs):
            j = i
            while j + 1 < len(xs) and xs[j + 1] == xs[i]:
                j += 1
            if j > i:
                r[order[i: j + 1]] = (i + j) / 2
            i = j + 1
        return r

    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(losses, reference) -> dict:
    import numpy as np

    both = [(x, y) for x, y in zip(losses, reference) if x is not None and y is not None]
    mismatch = sum((x is None) != (y is None) for x, y in zip(losses, reference))
    if not both:
        return {"n_compared": 0, "nan_mismatches": mismatch}
    x, y = np.array(both, dtype=np.float64).T
    diff = np.abs(x - y)
    return {
        "n_compared": len(both),
        "nan_mismatches": mismatch,
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "spearman": spearman(x, y),
    }


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere platform's (often empty) answer
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def run_worker_subprocess(variant: str, args, log_dir: Path) -> dict:
    out = log_dir / f"{variant}.json"
    log = log_dir / f"{variant}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--worker-out", str(out),
           "--samples", str(args.naive_samples or args.samples if variant == REFERENCE else args.samples),
           "--batch-tokens", str(args.batch_tokens),
           "--max-seq-len", str(args.max_seq_len), "--data", str(args.data), "--dtype", args.dtype,
           "--shard-rows", str(args.shard_rows), "--threads", str(args.threads)]
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text()[-4000:]
        raise SystemExit(f"worker {variant} failed (rc {proc.returncode}); log {log}:\n{tail}")
    record = json.loads(out.read_text().splitlines()[-1])
    record["subprocess_wall_s"] = round(elapsed, 2)
    return record


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Scoring benchmark (see the module docstring).")
    ap.add_argument("--samples", type=int, default=1000, help="first N rows of the data file (default 1000)")
    ap.add_argument("--naive-samples", type=int, default=0,
                    help="first N rows for naive_fp32 only (its tokens/s does not depend on N; agreement is "
                         "computed on these rows); default: --samples")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {', '.join(VARIANTS)}")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch (default 4096)")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="model dtype of flow_overhead")
    ap.add_argument("--shard-rows", type=int, default=256, help="pool rows per shard for flow_overhead")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--save-losses", action="store_true", help="keep every variant's per-sample losses in the JSON")
    ap.add_argument("--log-dir", type=Path, default=None, help="worker logs (default: a temp dir)")
    ap.add_argument("--resume", action="store_true", help="reuse finished workers' results found in --log-dir")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        record = worker_flow(args) if args.worker == "flow_overhead" else worker_direct(args.worker, args)
        args.worker_out.write_text(json.dumps(record) + "\n")
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    variants = sorted(variants, key=VARIANTS.index)  # the reference first
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-scoring-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    import torch

    started = dt.datetime.now(dt.timezone.utc)
    results = {
        "benchmark": "scoring",
        "command": "python benchmarks/scoring/run.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": args.threads or torch.get_num_threads(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": started.isoformat(timespec="seconds"),
        },
        "parameters": {
            "samples": args.samples, "naive_samples": args.naive_samples or args.samples, "data": str(args.data),
            "rows": "first N in file order",
            "model": "default (SmolLM2-135M-Instruct)", "max_seq_len": args.max_seq_len,
            "batch_tokens": args.batch_tokens, "flow_dtype": args.dtype, "shard_rows": args.shard_rows,
            "variants": variants, "reference": REFERENCE,
        },
        "definitions": {
            "tokens_per_s": "real (unpadded) prompt + response tokens of scorable samples / wall_s",
            "wall_s": "scoring loop only for the direct variants (model load, tokenization, warm-up excluded); "
                      "for flow_overhead: ingest + Prefect flow (server start, model load, score tasks) + catalog",
            "speedup_vs_naive": "tokens_per_s / naive_fp32 tokens_per_s (flow_overhead: its end-to-end tokens/s)",
            "agreement": "per-sample losses vs naive_fp32; criterion max_abs_diff for fp32, spearman for bf16",
            "peak_rss_mb": "ru_maxrss of the variant's own subprocess (weights and interpreter included)",
            "overhead_share": "1 - forward_s / wall_s, forward = time inside tasks.nll.batch_nll",
            "overhead_share_excl_one_off": "1 - forward_s / (wall_s - model_load_s - prefect_server_start_s)",
        },
        "variants": {},
    }
    for variant in variants:
        print(f"[{variant}] running (samples={args.samples}) ...", flush=True)
        done = log_dir / f"{variant}.json"
        if args.resume and done.exists():  # a finished worker of an interrupted run: keep its measurement
            record = json.loads(done.read_text().splitlines()[-1])
            record["resumed_from"] = str(done)
        else:
            record = run_worker_subprocess(variant, args, log_dir)
        if "subprocess_wall_s" not in record:
            record["subprocess_wall_s"] = float("nan")
        results["variants"][variant] = record
        extra = (f", overhead {record['overhead_share']:.1%} ({record['overhead_share_excl_one_off']:.1%} "
                 f"excl. one-off)" if variant == "flow_overhead" else "")
        print(f"[{variant}] {record['wall_s']:.2f} s, {record['tokens_per_s']:.0f} tokens/s, "
              f"peak RSS {record['peak_rss_mb']:.0f} MB, subprocess {record['subprocess_wall_s']:.1f} s{extra}",
              flush=True)

    ref = results["variants"].get(REFERENCE)
    for name, record in results["variants"].items():
        record["agreement_criterion"] = "spearman" if record["dtype"] == "bf16" else "max_abs_diff"
        if ref and name != REFERENCE:
            record["agreement_vs_naive"] = agreement(record["losses"], ref["losses"])
            record["speedup_vs_naive"] = record["tokens_per_s"] / ref["tokens_per_s"]
        elif ref:
            record["speedup_vs_naive"] = 1.0
        else:
            record["agreement_vs_naive"] = None
            record["speedup_vs_naive"] = None
    bf16, flow_rec = results["variants"].get("batched_bf16"), results["variants"].get("flow_overhead")
    results["goals"] = {
        "speedup_bf16_vs_naive": bf16["speedup_vs_naive"] if bf16 else None,
        "speedup_goal": GOAL_SPEEDUP,
        "speedup_met": (bf16["speedup_vs_naive"] >= GOAL_SPEEDUP) if bf16 and bf16["speedup_vs_naive"] else None,
        "overhead_share": flow_rec["overhead_share"] if flow_rec else None,
        "overhead_share_excl_one_off": flow_rec["overhead_share_excl_one_off"] if flow_rec else None,
        "overhead_goal": GOAL_OVERHEAD,
        "overhead_samples": args.samples,
        "overhead_met": (flow_rec["overhead_share"] < GOAL_OVERHEAD) if flow_rec else None,
        "overhead_met_excl_one_off": (flow_rec["overhead_share_excl_one_off"] < GOAL_OVERHEAD) if flow_rec else None,
        "note": "the goals are stated for 1,000 samples" if args.samples != 1000 else "",
    }
    if not args.save_losses:
        for record in results["variants"].values():
            record.pop("losses", None)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["total_benchmark_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} (worker logs in {log_dir})")


if __name__ == "__main__":
    main()
