"""Notice-to-durable-checkpoint time: from the training loop seeing a preemption notice to the checkpoint of the step
it reached being synced and in place on storage, and the bytes written, for the tiny test model and a hidden-1024
submodel on the CPU.

    python benchmarks/preemption_notice.py [--repeats 5]   # -> benchmarks/results_preemption_notice.json

Per model (a submodel: the backbone and one expert, after one AdamW step so that the optimizer has its state):
- `loop`: moedisco's loop (`train`) told of a notice at step 2 (`PreemptionNotice`, as SIGTERM or Ray's drain
  does): the `NoticeCheckpoint` a trainer logs and returns (seconds, bytes), the median over the repeats.
- the write alone, three ways, each starting from a flushed page cache (`os.sync()`), the median over the repeats:
  - `old`: the checkpoint writer before issue 30 (`save_checkpoint` at OLD_COMMIT: one file after another, no
    sync): `seconds_in_place` until renamed into place, `seconds` until its files are also synced, which storage
    that outlives the node needs;
  - `local_then_copy`: today's writer into a node-local folder, then a copy to the durable one, synced and renamed
    (the issue's "local disk first, upload after", the upload waited for, as a node about to go must);
  - `new`: today's `save_checkpoint`: the files serialised at once on threads, synced, renamed into place.
Both folders are on this machine's one disk; on a cluster the durable one is the shared volume, whose write bandwidth
then adds about bytes / bandwidth to `old` and `new` alike, and twice the bytes' traffic to `local_then_copy`.

`drain_s`: what the notice spends before a trainer can hear of it: `ray drain-node` as k8s/'s preStop runs it
(RAY_ADDRESS set, as KubeRay sets it; it connects to the cluster as a driver to learn its node's id), and with
`--node-id` given, against a one-node Ray started here, the median over the repeats; the watcher then adds up to its
poll interval (1 s for spot, `ray_cluster.preemption`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from _common import REPO, sized_config
from transformers import AutoModelForCausalLM

from moedisco.config.spec import TrainConfig
from moedisco.io.atomic import partial_of, put_in_place
from moedisco.job.metrics import MetricsWriter
from moedisco.models.architecture import with_num_experts
from moedisco.training.checkpoint import checkpoint_bytes, checkpoint_dir, save_checkpoint, sync_file
from moedisco.training.loop import Preempted, TrainContext, TrainHooks, train
from moedisco.training.preemption import PreemptionNotice

OLD_COMMIT = "3273ec75103293f6f943f2fbb991c854b9af7fac"  # the last commit before issue 30's checkpoint writer
SEQ_LEN, BATCH, NOTICE_STEP = 64, 2, 2
MODELS = {  # name: (hidden, layers, vocab); tiny as the tests' (hidden 32, 2 layers)
    "tiny": (32, 2, 97),
    "hidden_1024": (1024, 4, 8192),
}


def old_writer():
    """`save_checkpoint` as it was at OLD_COMMIT, loaded from git (the baseline this benchmark compares with)."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:moedisco/training/checkpoint.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("checkpoint_before_issue_30")
    exec(compile(source, "checkpoint_before_issue_30.py", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module.save_checkpoint


def build(name: str):
    hidden, layers, vocab = MODELS[name]
    torch.manual_seed(0)
    config = with_num_experts(sized_config(hidden, layers=layers, vocab=vocab), 1)
    return AutoModelForCausalLM.from_config(config), vocab


def trained_state(name: str):
    """A submodel and its AdamW after one step."""
    model, vocab = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, vocab, (BATCH, SEQ_LEN))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def timed(write) -> float:
    os.sync()  # every write starts from a page cache with nothing of an earlier one left to flush
    started = time.perf_counter()
    write()
    return time.perf_counter() - started


def sync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        sync_file(file)


def write_rows(name: str, repeats: int, scratch: Path) -> dict:
    model, optimizer = trained_state(name)
    state = {"step": NOTICE_STEP, "seconds": 0.0, "eval_loss": None}
    old_save, durable, local = old_writer(), scratch / "durable", scratch / "local"
    rows: dict[str, list] = {"old_in_place": [], "old": [], "local_then_copy": [], "new": []}
    for _ in range(repeats):
        shutil.rmtree(scratch, ignore_errors=True)
        ckpt = checkpoint_dir(durable, NOTICE_STEP)
        rows["old_in_place"].append(timed(lambda: old_save(durable, model, optimizer, dict(state), None, 1)))
        started = time.perf_counter()
        sync_tree(ckpt)  # what the old writer left in the page cache
        rows["old"].append(rows["old_in_place"][-1] + time.perf_counter() - started)
        num_bytes = checkpoint_bytes(ckpt)
        shutil.rmtree(scratch)

        def local_then_copy() -> None:
            written = save_checkpoint(local, model, optimizer, dict(state), None, 1)
            partial = partial_of(ckpt, shared=True)
            shutil.copytree(written, partial)
            sync_tree(partial)
            put_in_place(partial, ckpt)
            sync_file(ckpt.parent)

        rows["local_then_copy"].append(timed(local_then_copy))
        shutil.rmtree(scratch)
        rows["new"].append(timed(lambda: save_checkpoint(durable, model, optimizer, dict(state), None, 1)))
        assert checkpoint_bytes(ckpt) == num_bytes, "the writers write the same files"
    median = {key: round(statistics.median(values), 3) for key, values in rows.items()}
    return {"num_parameters": sum(p.numel() for p in model.parameters()), "num_bytes": num_bytes,
            "old": {"seconds_in_place": median["old_in_place"], "seconds": median["old"]},
            "local_then_copy": {"seconds": median["local_then_copy"], "bytes_written": 2 * num_bytes},
            "new": {"seconds": median["new"]}, "seconds_each": {k: [round(v, 3) for v in vs] for k, vs in rows.items()}}


def loop_row(name: str, repeats: int, scratch: Path) -> dict:
    """The loop's own record of its notice checkpoint (`Preempted.checkpoint`)."""
    records = []
    for _ in range(repeats):
        shutil.rmtree(scratch, ignore_errors=True)
        model, vocab = build(name)
        seqs = torch.randint(0, vocab, (16, SEQ_LEN), generator=torch.Generator().manual_seed(1))
        notice = PreemptionNotice()

        def notice_at(record: dict) -> None:
            if record["step"] == NOTICE_STEP:
                notice.notify("benchmark")

        cfg = TrainConfig(steps=100, batch_size=BATCH, lr=1e-4, eval_every=1, checkpoint_every=1000)
        context = TrainContext(scratch / "run", stage="submodel", seed=0, progress=False,
                               metrics=MetricsWriter(scratch / "metrics.jsonl"),
                               hooks=TrainHooks(on_progress=notice_at, preempted=notice))
        os.sync()
        try:
            train(model, seqs, None, cfg, context)
        except Preempted as stop:
            records.append(stop.checkpoint)
    assert all(r.durable and r.step == NOTICE_STEP for r in records)
    return {"seconds": round(statistics.median(r.seconds for r in records), 3), "num_bytes": records[0].num_bytes,
            "seconds_each": [r.seconds for r in records]}


def drain_row(repeats: int) -> dict:
    """Seconds until `ray drain-node` returns, without and with `--node-id`, each against a fresh one-node cluster
    (a node already draining takes no second drain, and a driver's connection to it may wait)."""
    import ray

    seconds: dict[str, list[float]] = {"as_the_prestop_runs_it": [], "with_node_id": []}
    refused = []
    for _ in range(repeats):
        for key in seconds:
            ray.init(address="local", num_cpus=1, include_dashboard=False)  # never another cluster on this machine
            try:
                context = ray.get_runtime_context()
                env = {**os.environ, "RAY_ADDRESS": context.gcs_address}  # as KubeRay sets it in a worker pod
                cli = [str(Path(sys.executable).with_name("ray")), "drain-node", "--reason",
                       "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "benchmark",
                       "--deadline-remaining-seconds", "600"]
                if key == "with_node_id":
                    cli += ["--node-id", context.get_node_id()]
                started = time.perf_counter()
                done = subprocess.run(cli, capture_output=True, text=True, check=False, env=env)
                seconds[key].append(time.perf_counter() - started)
                if done.returncode:
                    refused.append(done.stderr.strip().splitlines()[-1][:200])
            finally:
                ray.shutdown()
    return {**{key: round(statistics.median(values), 2) for key, values in seconds.items()},
            "seconds_each": {key: [round(v, 2) for v in values] for key, values in seconds.items()}, "refused": refused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="Runs of each row; the median is reported.")
    args = parser.parse_args()
    result = {"cpu_threads": torch.get_num_threads(), "repeats": args.repeats, "old_commit": OLD_COMMIT,
              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:  # /tmp: the same disk as the repository here, not a tmpfs
        for name in MODELS:
            row = write_rows(name, args.repeats, Path(tmp) / "writes")
            row["loop"] = loop_row(name, args.repeats, Path(tmp) / "loop")
            result["models"][name] = row
            print(name, json.dumps(row), flush=True)
    result["drain_s"] = drain_row(args.repeats)
    (REPO / "benchmarks" / "results_preemption_notice.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
