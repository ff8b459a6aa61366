"""The ``curvop`` command: ``demo``, ``spectrum MODULE:FACTORY``, ``study bn-residual``,
``study edge-of-stability`` and ``study optimizers``.

Exit codes: 0 success, 1 a run failed (one ``curvop: error: ...`` line on stderr, whatever raised
it; ``--traceback`` prints the full traceback instead), 2 bad usage (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import traceback
from typing import Any, Callable, Sequence

__all__ = ["CLIError", "main", "build_parser"]


class CLIError(Exception):
    """A failure to report as one line on stderr (no traceback)."""


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _common(p: argparse.ArgumentParser, out: str, seed_help: str) -> None:
    p.add_argument("--out", default=out, metavar="DIR", help=f"directory for the outputs (default: {out})")
    p.add_argument("--seed", type=int, default=0, help=f"seed of {seed_help} (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--threads", type=_positive, default=1, metavar="N",
                   help="torch CPU threads (default: 1; small models run fastest on one, and more threads "
                        "on a busy machine can be many times slower; raise it for large models)")
    p.add_argument("--traceback", action="store_true",
                   help="on an error, print the full traceback instead of one line")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``curvop`` (one sub-parser per command)."""
    from curvop import __version__

    parser = argparse.ArgumentParser(
        prog="curvop", description="Spectra of neural-network loss Hessians: top eigenvalues, trace, density.")
    parser.add_argument("--version", action="version", version=f"curvop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn's digits and measure its Hessian",
                          description="Train a small CNN on the 8x8 digits shipped with scikit-learn (CPU, "
                                      "no download), then print the top eigenvalues, trace and spectral "
                                      "density of its training-loss Hessian; write density.png and results.json.")
    _common(demo, "curvop-demo", "data split, weights, probes")
    demo.add_argument("--epochs", type=_positive, default=10, help="training epochs (default: 10)")
    demo.add_argument("-k", type=_positive, default=5, help="number of top eigenvalues (default: 5)")
    demo.add_argument("--quick", action="store_true",
                      help="a short run: 1 epoch and fewer products (for tests and a first look)")
    demo.set_defaults(func=_demo)

    spec = sub.add_parser("spectrum", help="measure the Hessian of your own PyTorch model",
                          description="Measure the loss Hessian of your PyTorch model. FACTORY is a function "
                                      "in MODULE (a module name or a path to a .py file) returning "
                                      "(model, loss_fn, data); data is one (inputs, targets) batch or a "
                                      "re-iterable of batches. The model is put in eval mode. The "
                                      "module is imported as `python FILE` would run it (its folder "
                                      "on sys.path, sys.argv = [FILE]) after seeding random, numpy "
                                      "and torch with --seed.")
    spec.add_argument("target", metavar="MODULE:FACTORY", help="e.g. mypkg.models:make or ./exp.py:make")
    _common(spec, "curvop-spectrum", "random, numpy and torch before the factory runs, and of the probes")
    spec.add_argument("-k", type=_positive, default=5, help="number of top eigenvalues (default: 5)")
    spec.add_argument("--device", default="cpu", help="torch device for model and data (default: cpu)")
    spec.add_argument("--steps", type=_positive, default=80, help="Lanczos steps per density probe (default: 80)")
    spec.add_argument("--probes", type=_positive, default=2, help="density probes (default: 2)")
    spec.add_argument("--trace-matvecs", type=_positive, default=99,
                      help="products for the trace estimate (default: 99)")
    spec.set_defaults(func=_spectrum)

    study = sub.add_parser("study", help="run a study", description="Run one of curvop's studies.")
    studies = study.add_subparsers(dest="study", metavar="STUDY", required=True)
    bn = studies.add_parser("bn-residual", help="PyHessian's BatchNorm / residual-connection study on digits",
                            description="Train shallow and deep CNNs with and without BatchNorm and "
                                        "residual connections on scikit-learn's digits, measure each "
                                        "Hessian, and write a report and a density figure.")
    _common(bn, "curvop-study", "data split, weights, probes")
    bn.add_argument("--quick", action="store_true", help="a short run (smaller models, fewer epochs)")
    bn.set_defaults(func=_bn_residual)
    eos = studies.add_parser("edge-of-stability", help="full-batch GD at three step sizes: does sharpness settle at 2/eta?",
                             description="Cohen et al.'s edge of stability on scikit-learn's digits: full-batch "
                                         "gradient descent at three step sizes, lambda_max tracked; writes "
                                         "results.json, sharpness.png and report.md.")
    _common(eos, "curvop-eos", "weights and probes")
    eos.add_argument("--quick", action="store_true", help="larger step sizes, fewer steps (a few minutes)")
    eos.set_defaults(func=_edge_of_stability)
    opt = studies.add_parser("optimizers", help="AdamW, AdaHessian, Sophia-H, Sophia-G: steps and time to a target loss",
                             description="AdaHessian's and Sophia's claims at small scale: the digits CNN and a "
                                         "character transformer on the standard library's docstrings, a small "
                                         "learning-rate sweep per optimizer, 5 seeds; writes results.json, "
                                         "optimizers.png and report.md.")
    _common(opt, "curvop-optimizers", "every run (added to the study's seeds)")
    opt.add_argument("--quick", action="store_true", help="one learning rate, 2 seeds, 30 steps (under a minute)")
    opt.add_argument("--jobs", type=_positive, default=None, metavar="N",
                     help="training runs at a time, each a process of one torch thread (default: 2; 1 with --quick)")
    opt.set_defaults(func=_optimizers)
    return parser


def _say(args: argparse.Namespace) -> Callable[[str], None]:
    return (lambda s: None) if args.json else print


# Every command is a function of plain keyword arguments (``run(out, *, seed=..., quiet=..., say=...,
# ...)`` in its module under curvop.studies) returning the results as a dict; these handlers only map
# the parsed flags onto those keywords.
def _demo(args: argparse.Namespace) -> dict[str, Any]:
    from curvop.studies import demo

    return demo.run(args.out, quick=args.quick, epochs=args.epochs, k=args.k, seed=args.seed, quiet=args.quiet,
                    say=_say(args))


def _bn_residual(args: argparse.Namespace) -> dict[str, Any]:
    from curvop.studies import bn_residual

    command = "curvop study bn-residual" + (" --quick" if args.quick else "") + f" --seed {args.seed}"
    return bn_residual.run(args.out, quick=args.quick, seed=args.seed, quiet=args.quiet, command=command,
                           say=_say(args))


def _edge_of_stability(args: argparse.Namespace) -> dict[str, Any]:
    from curvop.studies import edge_of_stability

    command = "curvop study edge-of-stability" + (" --quick" if args.quick else "") + f" --seed {args.seed}"
    return edge_of_stability.run(args.out, quick=args.quick, seed=args.seed, quiet=args.quiet, command=command,
                                 say=_say(args))


def _optimizers(args: argparse.Namespace) -> dict[str, Any]:
    from curvop.studies import optimizers

    jobs = "" if args.jobs is None else f" --jobs {args.jobs}"
    command = "curvop study optimizers" + (" --quick" if args.quick else "") + f" --seed {args.seed}{jobs}"
    return optimizers.run(args.out, quick=args.quick, seed=args.seed, quiet=args.quiet, command=command,
                          jobs=args.jobs, say=_say(args))


def _announce_spectrum(args: argparse.Namespace) -> None:
    """Say what is being built before anything slow (importing torch, the module, the factory)."""
    module, _, name = args.target.rpartition(":")
    _say(args)(f"curvop spectrum: importing {module or args.target} and calling {name or '?'}() for "
               "(model, loss_fn, data) ...")
    sys.stdout.flush()


def _spectrum(args: argparse.Namespace) -> dict[str, Any]:
    from curvop.studies import own_model

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    return own_model.run(args.target, out=args.out, device=args.device, k=args.k, seed=args.seed,
                         steps=args.steps, probes=args.probes, trace_matvecs=args.trace_matvecs,
                         quiet=args.quiet, say=_say(args), options=options)


def _check_out(out: str) -> None:
    """Refuse an ``--out`` that names an existing file, before any work."""
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out} is a file; pass a directory (it is created if missing)")


def _one_line(err: BaseException) -> str:
    """``err`` as one line: curvop's own errors as they are, others prefixed with their type."""
    from curvop.studies.own_model import InputError, UserCodeError

    if isinstance(err, SystemExit):
        text = f"the code run by curvop called sys.exit({err.code!r})"
    else:
        text = " ".join(str(err).split()) or "(no message)"
        if not isinstance(err, (CLIError, InputError)):
            text = f"{type(err).__name__}: {text}"
    if len(text) > 600:
        text = text[:600] + " ..."
    plain = isinstance(err, (CLIError, InputError)) and not isinstance(err, UserCodeError)
    return text if plain else f"{text} (--traceback shows where)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``curvop`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Anything raised while the command runs (by curvop or by the user's code, ``SystemExit``
    included) ends as one ``curvop: error: ...`` line on stderr and exit code 1, or as the full
    traceback with ``--traceback``. torch's thread count is restored before returning.
    """
    args = build_parser().parse_args(argv)
    threads_before = None
    try:
        _check_out(args.out)
        if args.command == "spectrum":  # within a second: before torch, the module and the factory load
            _announce_spectrum(args)
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        results = args.func(args)
        if args.json:
            print(json.dumps(results, indent=2))
    except KeyboardInterrupt:
        print("curvop: interrupted", file=sys.stderr)
        return 130
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the command promises one line, whatever failed
        if args.traceback:
            traceback.print_exc()
        else:
            print(f"curvop: error: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        if threads_before is not None:
            import torch

            torch.set_num_threads(threads_before)
    return 0
