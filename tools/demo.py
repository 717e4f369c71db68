"""`make demo`: the whole suite on a generated corpus, on CPU, in minutes: corpus -> MoCo v2 and
SANE pretraining -> conversion -> detection fine-tunes (and random init) over seeds -> table, plots.

The stages are those of `slurm/pipeline.py` (the same commands the Slurm pipeline runs), run in
order here; a stage whose output is complete is skipped, so a second `make demo` reuses them.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slurm.pipeline import PipelineError, build_stages, pending, run_sequential  # noqa: E402
from tools import plot_results, results_table  # noqa: E402
from tools.make_synthetic_data import CorpusError, make_corpus  # noqa: E402

PRETRAIN_CONFIG = REPO / "configs/pretrain/demo.yaml"
DETECTION_CONFIG = REPO / "configs/detection/demo_shapes_voc_R_18_C4.yaml"
# The demo config is SANE (SLR + MM); MoCo v2 is the same trainer with both modules off and
# the positive scored against the queue only (method.md, "Variants").
BACKBONES = {
    "demo_mocov2": (PRETRAIN_CONFIG, ("method=mocov2", "slr.enabled=false", "mm.enabled=false",
                                      "model.in_batch_negatives=false")),
    "demo_sane": (PRETRAIN_CONFIG, ()),
}


def build_demo_stages(out, corpus, seeds):
    """Pretrain + convert each backbone, fine-tune from each and from random init, the table."""
    return build_stages(BACKBONES, corpus / "imagefolder", out, voc_configs=[DETECTION_CONFIG], seeds=seeds,
                        random_init=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="output directory (default: demo_output)")
    parser.add_argument("--seeds", type=int, default=2, help="fine-tunes per backbone (default: 2)")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-test", type=int, default=100)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    out = Path(args.out).resolve()
    start = time.time()

    corpus = out / "shapes"  # the folder name is the pretraining task's name in the table
    if (corpus / "corpus.json").is_file():
        print(f"[corpus] complete: {corpus}")
    else:
        try:
            make_corpus(corpus, seed=0, num_train=args.num_train, num_test=args.num_test, size=128,
                        overwrite=True)
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

    # results.md is the pipeline's last stage; the CSV and figures are cheap: always rebuilt.
    runs = [str(out / "pretrain"), str(out / "transfer")]
    results_table.main([*runs, "--format", "csv", "--out", str(out / "results.csv")])
    plot_results.main([*runs, "--out", str(out / "plots")])
    print((out / "results.md").read_text())
    print(f"demo: done in {time.time() - start:.0f} s; table {out / 'results.md'}, "
          f"figures {out / 'plots'}")


if __name__ == "__main__":
    main()
