"""`make bench`: the paper's ablation grid (Table 4) on a corpus where pretraining learns in CPU
minutes. Each method x pretraining seed is pretrained, probed (kNN + linear) and fine-tuned once,
against the same network at random init; writes the results table, figures and docs-ready notes.

The stages are the pipeline's (slurm/pipeline.build_stages with pretrain_seeds), run in order;
a rerun skips what is complete. docs/bench.md holds the committed result and how it was made.
Command: tools/bench.py (or `make bench`).
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

from slurm.pipeline import REPO, PipelineError, build_stages, pending, run_sequential
from suite import contract, plots, provenance, results
from suite.corpus import CorpusError, make_corpus

PRETRAIN_CONFIG = REPO / "configs/pretrain/bench_objects_r18.yaml"
DETECTION_CONFIG = REPO / "configs/detection/bench_objects_voc_R_18_C4.yaml"
# the rows of the paper's Table 4 that separate each change: the in-batch negatives of B̄ (which
# SANE adds to MoCo v2), p, q, MM alone, and all of them
METHODS = ("mocov2", "mocov2_inbatch", "slr_p", "slr_q", "mm", "sane")
# the linear probe on cached frozen features (the paper's CIFAR protocol: Adam, 200 epochs),
# at the pretraining crop size; one loader process on 2 cores
PROBE_OPTS = ("--image-size", "32", "--num-workers", "0")


def bench_stages(out, corpus, methods, seeds):
    backbones = {m: (PRETRAIN_CONFIG, (f"method={m}",)) for m in methods}
    return build_stages(backbones, contract.Corpus(corpus).imagefolder, out, voc_configs=[DETECTION_CONFIG],
                        random_init=True, probe_presets=("cifar",), probe_opts=PROBE_OPTS,
                        pretrain_seeds=list(range(seeds)))


def gains(sections, baseline=contract.RANDOM_INIT, column="kNN top-1"):
    """{backbone: mean gain over `baseline`} of `column` in the pretraining section."""
    for kind, _, _, rows in sections:
        if kind != "pretrain":
            continue
        cells = {label: c.get(column) for label, source, c in rows if source == "measured"}
        if cells.get(baseline):
            return {b: c[0] - cells[baseline][0] for b, c in cells.items() if c and b != baseline}
    return {}


def machine():
    """'<CPU model>, N cores; Python x, torch y': where the numbers were measured."""
    import torch

    cpu, info = platform.processor() or platform.machine(), Path("/proc/cpuinfo")
    if info.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_output", help="output directory (default: bench_output)")
    parser.add_argument("--seeds", type=int, default=3, help="pretraining seeds per method (default: 3)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"default: {' '.join(METHODS)}")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=400)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    out = Path(args.out).resolve()
    layout = contract.Layout(out)
    start = time.time()
    commit, dirty = provenance.suite_commit()  # the code the stages run: read before they start

    corpus = layout.corpus("objects")  # the folder name is the pretraining task's name in the table
    if not contract.Corpus(corpus).record.is_file():
        try:
            make_corpus(corpus, seed=0, num_train=args.num_train, num_test=args.num_test, size=64,
                        overwrite=True, preset="objects")
        except CorpusError as e:
            sys.exit(f"bench: error: {e}")
    try:
        stages = bench_stages(out, corpus, args.methods, args.seeds)
    except PipelineError as e:
        sys.exit(f"bench: error: {e}")
    todo = pending(stages)
    print(f"[bench] {len(todo)} of {len(stages)} stages to run under {out}", flush=True)

    def log(line):
        print(f"[bench {time.time() - start:6.0f} s] {line}", flush=True)

    try:
        run_sequential(stages, log=log, env={"SHAPES_ROOT": str(corpus)})
    except PipelineError as e:
        sys.exit(f"bench: error: {e}")
    runs = [str(layout.pretrain_root), str(layout.transfer_root)]
    results.main([*runs, "--format", "csv", "--out", str(out / "results.csv")])
    plots.main([*runs, "--out", str(out / "plots")])
    found, _ = results.find_runs(runs)
    sections = results.build_sections(found, {})
    lines = [f"- {b}: {g:+.1f} kNN points over random init" for b, g in sorted(gains(sections).items())]
    summary = "\n".join([f"Command: `python tools/bench.py --out {args.out} --seeds {args.seeds}` "
                         f"(commit {provenance.short(commit, 7) if commit else '?'}{', dirty' if dirty else ''}), "
                         f"{time.time() - start:.0f} s of which this run "
                         f"ran {len(todo)} stages", f"Machine: {machine()}", "", *lines, ""])
    contract.write_text(out / "summary.md", summary)
    print(layout.results.read_text())
    print(summary)


if __name__ == "__main__":
    main()
