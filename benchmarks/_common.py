"""Helpers shared by the benchmark scripts: a sized MoE config and peak-memory measurement in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def publish(report: dict, out: Path | None) -> None:
    """Print a benchmark's JSON report, and write it to `out` (a results_*.json) when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def add_job_arguments(parser, example_override: str) -> None:
    """The options every job-running benchmark takes: its seed, spec overrides, a quick plumbing run, an output."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help=f"override for every job, e.g. {example_override}")
    parser.add_argument("--quick", action="store_true", help="tiny steps: checks the plumbing, not the figures")
    parser.add_argument("--out", type=Path)


def sized_config(hidden: int, num_experts: int = 4, layers: int = 4, vocab: int = 8192, arch: str = "qwen2_moe"):
    from moedisco.config.spec import ModelConfig
    from moedisco.models.architecture import build_moe_config

    cfg = ModelConfig(arch=arch, num_experts=num_experts, num_experts_per_tok=2, hidden_size=hidden,
                      intermediate_size=4 * hidden, moe_intermediate_size=2 * hidden,
                      shared_expert_intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=1024)
    return build_moe_config(cfg, vocab, eos_id=0, pad_id=1)


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5) and return the current RSS in MB.

    Without the reset, a transient peak during imports would hide the measured work's own peak.
    """
    Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024.0


class AnonPeak:
    """Samples the process's anonymous resident memory (RssAnon) in a thread; `.peak_mb` above the start.

    Peak RSS (VmHWM) also counts file pages touched through mmap, which safetensors uses to read checkpoints;
    those pages are cache the kernel can drop, not memory the merge holds, so the merge benchmark reads RssAnon.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak_mb, self._stop = interval_s, 0.0, None

    @staticmethod
    def _anon_mb() -> float:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))) / 1024.0

    def __enter__(self):
        import threading

        self.start_mb = self._anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self._anon_mb() - self.start_mb)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._anon_mb() - self.start_mb)


def peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024.0


def run_child(module_file: str, payload: dict) -> dict:
    """Run `python module_file --child JSON` in a fresh process (clean peak-RSS counter) and parse its JSON line."""
    out = subprocess.run([sys.executable, module_file, "--child", json.dumps(payload)], capture_output=True,
                         text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_args(doc: str, child, argv=None):
    """Parse `--quick`; in `--child JSON` mode run `child(payload)`, print its JSON and return None."""
    import argparse

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="Fewer, smaller sizes: a few minutes.")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return None
    return args
