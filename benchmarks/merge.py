"""Time and peak memory of merging E submodels as the model grows.

    python benchmarks/merge.py [--quick]

For each size: E submodel files are written, then merged in a fresh process that records its peak resident memory
above its baseline, with sample weights and Fisher-weighted (each submodel also has a second-moment file, as
`merge.weighting: fisher` writes), each with the submodels' router rows (`concat`) and with the default `centroid`
rows (CENTROID_SEQUENCES sequences of SEQUENCE_LENGTH random tokens per cluster, run through the merged model one
decoder layer at a time, then patched into the shards as `stage_merge` does). Target: peak anonymous memory
<= 1.3 x (one submodel + the largest tensor), not E submodels; time close to reading and writing the files
(measured in the same child as `io_seconds`).
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path

from _common import AnonPeak, run_child, sized_config

NUM_EXPERTS = 4
CENTROID_SEQUENCES = 16  # merge.centroid_sequences' default
SEQUENCE_LENGTH = 512


def write_submodels(hidden: int, folder: Path) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from moedisco.models.weights import save_weights, unique_state_dict
    from moedisco.stages.split import load_submodel

    torch.manual_seed(0)
    save_weights(AutoModelForCausalLM.from_config(sized_config(hidden, NUM_EXPERTS)), folder / "source")
    sizes = []
    for k in range(NUM_EXPERTS):
        state = unique_state_dict(load_submodel(folder / "source", k))
        save_file(state, folder / f"sub{k}.safetensors")
        moments = {name: torch.rand_like(t).to(torch.bfloat16) for name, t in state.items()}
        save_file(moments, folder / f"moments{k}.safetensors")
        sizes.append((folder / f"sub{k}.safetensors").stat().st_size)
    return {"submodel_mb": sizes[0] / 1e6, "largest_tensor_mb": max(t.nbytes for t in state.values()) / 1e6}


def child(payload: dict) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from moedisco.stages.merge import merge_submodels
    from moedisco.stages.router_rows import centroid_router_rows, patch_tensors

    folder = Path(payload["folder"])
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 8192, (CENTROID_SEQUENCES, SEQUENCE_LENGTH), generator=generator)
               for _ in range(NUM_EXPERTS)]
    files = [folder / f"sub{k}.safetensors" for k in range(NUM_EXPERTS)]
    fisher = [folder / f"moments{k}.safetensors" for k in range(NUM_EXPERTS)] if payload["fisher"] else None
    started = time.perf_counter()
    with AnonPeak() as memory:
        merge_submodels(folder / "source", files, [1 / NUM_EXPERTS] * NUM_EXPERTS, "concat", folder / "merged",
                        max_file_bytes=payload["shard_bytes"], fisher=fisher)
        if payload["router_init"] == "centroid":
            patch_tensors(folder / "merged", centroid_router_rows(folder / "merged", samples))
    merge_seconds = time.perf_counter() - started
    peak = memory.peak_mb
    started = time.perf_counter()  # the I/O floor: read every input once, write the output once
    for path in files:
        load_file(path)
    for index, shard in enumerate(sorted((folder / "merged").glob("*.safetensors"))):
        save_file(load_file(shard), folder / f"io_probe{index}.safetensors")
    return {"merge_seconds": merge_seconds, "peak_mb": peak, "io_seconds": time.perf_counter() - started}


def main(argv=None) -> dict:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="hidden 256 and 512 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="hidden sizes")
    parser.add_argument("--router-init", nargs="+", default=["concat", "centroid"], choices=["concat", "centroid"])
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    rows = []
    for hidden in ([256, 512] if args.quick else args.sizes):
        with tempfile.TemporaryDirectory() as tmp:
            sizes = write_submodels(hidden, Path(tmp))
            shard = int(sizes["submodel_mb"] * 1e6)  # one shard = one submodel's size
            for fisher, router_init in itertools.product((False, True), args.router_init):
                payload = {"folder": tmp, "shard_bytes": shard, "fisher": fisher, "router_init": router_init}
                row = {"hidden": hidden, "weighting": "fisher" if fisher else "samples", "router_init": router_init,
                       **sizes, **run_child(__file__, payload)}
                row["bound_mb"] = row["submodel_mb"] + row["largest_tensor_mb"]
                row["peak_over_bound"] = row["peak_mb"] / row["bound_mb"]
                rows.append(row)
    result = {"benchmark": "merge", "num_experts": NUM_EXPERTS, "centroid_sequences": CENTROID_SEQUENCES,
              "sequence_length": SEQUENCE_LENGTH, "rows": rows}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
