"""`make demo`: the whole suite on a generated corpus, on CPU, in minutes: corpus -> MoCo v2 and
SANE pretraining -> probes (kNN, linear) -> conversion -> detection fine-tunes (and random init)
over seeds -> table (SANE paired with MoCo v2 and with random init over the seeds, the provenance
footnote), plots.

The corpus and recipe are the bench's (suite/bench.py, docs/bench.md: the `objects` preset, where
a few CPU minutes of pretraining lift kNN above random init); the stages are those of
`slurm/pipeline.py` (the same commands the Slurm pipeline runs), run in order here; a stage whose
output is complete is skipped, so a second `make demo` reuses them. Command: tools/demo.py.
"""
import argparse
import sys
import time
from pathlib import Path

from slurm.pipeline import PipelineError, build_stages, pending, run_sequential
from suite import contract, plots, results
from suite.bench import DETECTION_CONFIG, PRETRAIN_CONFIG, PROBE_OPTS
from suite.corpus import CorpusError, make_corpus

# one config, two methods (pretrain.config.METHODS): MoCo v2 and SANE (SLR + MM)
BACKBONES = {"demo_mocov2": (PRETRAIN_CONFIG, ("method=mocov2",)),
             "demo_sane": (PRETRAIN_CONFIG, ("method=sane",))}
BASELINES = ("demo_mocov2", contract.RANDOM_INIT)  # the table pairs every other row with each


def build_demo_stages(out, corpus, seeds):
    """Pretrain, probe and convert each backbone, fine-tune from each and from random init (probed
    too), the table."""
    return build_stages(BACKBONES, contract.Corpus(corpus).imagefolder, out, voc_configs=[DETECTION_CONFIG],
                        seeds=seeds, random_init=True, probe_presets=("cifar",), probe_opts=PROBE_OPTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="output directory (default: demo_output)")
    parser.add_argument("--seeds", type=int, default=2, help="fine-tunes per backbone (default: 2)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=400)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    out = Path(args.out).resolve()
    layout = contract.Layout(out)
    start = time.time()

    corpus = layout.corpus("shapes")  # the folder name is the pretraining task's name in the table
    if contract.Corpus(corpus).record.is_file():
        print(f"[corpus] complete: {corpus}")
    else:
        try:
            make_corpus(corpus, seed=0, num_train=args.num_train, num_test=args.num_test, size=64,
                        overwrite=True, preset="objects")
        except CorpusError as e:
            sys.exit(f"demo: error: {e}")
        print(f"[corpus] {args.num_train} train + {args.num_test} test images in {corpus}")

    stages = build_demo_stages(out, corpus, args.seeds)
    todo = pending(stages)
    for i, stage in enumerate(stages, 1):
        print(f"[{i}/{len(stages)}] {stage.name}" + ("" if stage in todo else " (complete)"), flush=True)

    def log(line):
        print(f"[demo {time.time() - start:6.0f} s] {line}", flush=True)

    try:
        run_sequential(stages, log=log, env={"SHAPES_ROOT": str(corpus)})
    except PipelineError as e:
        sys.exit(f"demo: error: {e}")

    # results.md is the pipeline's last stage; rebuilt here with SANE paired against both MoCo v2 and
    # random init (the pipeline's pairs with MoCo v2 alone); the CSV and figures are cheap: always rebuilt.
    runs = [str(layout.pretrain_root), str(layout.transfer_root)]
    baselines = ["--baseline", *BASELINES]
    results.main([*runs, *baselines, "--out", str(layout.results)])
    results.main([*runs, *baselines, "--format", "csv", "--out", str(out / "results.csv")])
    plots.main([*runs, "--out", str(out / "plots")])
    print(layout.results.read_text())
    print(f"demo: done in {time.time() - start:.0f} s; table {layout.results}, "
          f"figures {out / 'plots'}; every run's provenance: tools/results_table.py {out} --provenance")


if __name__ == "__main__":
    main()
