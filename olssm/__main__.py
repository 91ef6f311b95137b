"""Command line:

    python -m olssm table [--latex] [--steps N]          derive and check the catalogue
    python -m olssm derive FILE.py:NAME [--latex] [--steps N] [--source]
                                                         derive and check your own objective
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time


def table(latex: bool = False, steps: int = 6, out=sys.stdout, derived: bool = True) -> list[dict]:
    """Derive and check every catalogue entry and print the table (markdown or LaTeX); with `derived` (markdown)
    also the objectives of catalogue.DERIVED, checked against the solver, whose rows come last in the result."""
    from . import catalogue, verify
    rows = []
    for name, entry in catalogue.ENTRIES.items():
        t0 = time.perf_counter()
        rule = entry.rule
        derive_s = time.perf_counter() - t0
        pub = catalogue.check_published(entry)
        rep = verify(entry.objective, steps=steps)
        rows.append(dict(name=name, title=entry.title, source=entry.source, objective=entry.objective,
                         rule=rule, published_error=pub, solver_error=rep.max_error,
                         ok=rep.ok and pub < 1e-10, derive_s=derive_s, published_text=entry.published_text))
    if latex:
        print(r"\begin{tabular}{lllll}", file=out)
        print(r"model & objective & update & derived recurrence & max error \\ \hline", file=out)
        for r in rows:
            print(rf"{r['title']} & ${r['objective'].latex()}$ & {r['rule'].mode} & "
                  rf"${r['rule'].latex()}$ & {max(r['published_error'], r['solver_error']):.1e} \\", file=out)
        print(r"\end{tabular}", file=out)
    else:
        print("| model | objective | update | derived recurrence | structure | max error vs published | "
              "max error vs solver |", file=out)
        print("|---|---|---|---|---|---|---|", file=out)
        for r in rows:
            rec = "<br>".join(r["rule"].lines())
            print(f"| {r['title']} | `{r['objective'].summary()}` | {r['rule'].mode} | {rec} | "
                  f"{r['rule'].structure} | {r['published_error']:.1e} | {r['solver_error']:.1e} |", file=out)
        n_ok = sum(r["ok"] for r in rows)
        print(f"\n{n_ok}/{len(rows)} derived rules match their published recurrence (float64, rel. err < 1e-10) "
              f"and the numerical solver (rel. err < 1e-8).", file=out)
    if derived and not latex:
        extra = _derived_rows(steps)
        print("\nObjectives no paper names (catalogue.DERIVED), derived the same way, checked against the solver:\n",
              file=out)
        print("| name | objective | update | derived recurrence | structure | max error vs solver |", file=out)
        print("|---|---|---|---|---|---|", file=out)
        for r in extra:
            rec = "<br>".join(r["rule"].lines())
            print(f"| {r['name']} | `{r['objective'].summary()}` | {r['rule'].mode} | {rec} | {r['rule'].structure} | "
                  f"{r['solver_error']:.1e} |", file=out)
        rows = rows + extra
    return rows


def _derived_rows(steps: int) -> list[dict]:
    from . import catalogue, verify
    rows = []
    for name, make in catalogue.DERIVED.items():
        obj = make()
        rep = verify(obj, steps=steps)
        rows.append(dict(name=name, title=obj.name, objective=obj, rule=catalogue.rule(name),
                         solver_error=rep.max_error, ok=rep.ok, derived_only=True))
    return rows


def _steps(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _usage_error(message: str):
    print(f"olssm derive: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_objective(spec: str):
    """FILE.py:NAME or package.module:NAME -> the Objective (NAME may also be a function of no arguments
    returning one). A file runs as a module of its own, its folder first on sys.path (its imports of
    neighbours work as when it is run directly)."""
    import importlib
    import importlib.util
    import os
    from .objectives import Objective
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        _usage_error(f"expected FILE.py:NAME or module:NAME, got {spec!r}")
    try:
        if where.endswith(".py") or os.sep in where:
            if not os.path.isfile(where):
                _usage_error(f"no such file {where!r}")
            folder = os.path.dirname(os.path.abspath(where))
            if folder not in sys.path:
                sys.path.insert(0, folder)
            mod_name = "olssm_user_" + os.path.splitext(os.path.basename(where))[0]
            mod_spec = importlib.util.spec_from_file_location(mod_name, where)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_name] = module   # dataclasses and pickling look the module up by name
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except SystemExit:
        raise
    except ImportError as e:
        _usage_error(f"cannot import {where!r}: {e}")
    except Exception as e:   # the file's own error (SyntaxError, NameError, ...): a loading error, not a mismatch
        _usage_error(f"running {where!r} failed: {type(e).__name__}: {e}")
    if not hasattr(module, name):
        found = sorted(n for n, v in vars(module).items() if isinstance(v, Objective))
        # NAME may also be a function returning an Objective (not called here: it may be costly or need arguments)
        funcs = sorted(n for n, v in vars(module).items()
                       if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_"))
        _usage_error(f"{where!r} has no {name!r}; Objectives there: {found or 'none'}"
                     + (f"; functions there (NAME may be one returning an Objective): {funcs}" if funcs else ""))
    obj = getattr(module, name)
    if callable(obj) and not isinstance(obj, Objective):
        try:
            inspect.signature(obj).bind()
        except TypeError as e:
            _usage_error(f"{spec!r} is a function; it is called with no arguments, which it does not take: {e}")
        except ValueError:      # no signature to read (a builtin): let the call tell
            pass
        try:
            obj = obj()
        except Exception as e:
            _usage_error(f"{spec!r} raised {type(e).__name__}: {e}")
    if not isinstance(obj, Objective):
        _usage_error(f"{spec!r} is of type {type(obj).__name__}, not an olssm.objectives.Objective")
    return obj


def derive_command(spec: str, latex: bool = False, steps: int = 6, source: bool = False, out=None) -> int:
    """Print the derived rule of one objective and its check against the numerical solver; 0 if it agrees,
    1 if not, 3 if the objective has no closed form, 4 if the objective is too ill-conditioned for the float64 solver
    to check the rule (verify's INCONCLUSIVE; 2: a usage or loading error, as argparse's)."""
    from . import derive, verify
    from .objectives import DerivationError
    out = sys.stdout if out is None else out   # read at call time (a test's capture replaces sys.stdout)
    try:
        obj = load_objective(spec)
    except DerivationError as e:   # raised while the file builds its Objective
        print(f"olssm derive: building {spec!r} failed: {e}", file=sys.stderr)
        return 2
    import warnings
    shown = set()

    def show(caught):
        # derive's warnings are raised at the first frame outside olssm, which here is runpy ("<frozen runpy>:88:
        # IndefiniteHessianWarning: ..."): print them as the command's own, once each
        for w in caught:
            text = f"olssm derive: {w.category.__name__}: {w.message}"
            if text not in shown:
                shown.add(text)
                print(text, file=sys.stderr)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rule = derive(obj)
    except DerivationError as e:
        show(caught)
        msg = str(e)
        print(msg if msg.startswith("no closed form") else f"no closed form: {msg}", file=out)
        return 3
    show(caught)
    print(f"objective: {obj.summary()}  (update: {rule.mode})", file=out)
    print(rule.latex() if latex else str(rule), file=out)
    print(f"structure: {rule.structure}", file=out)
    print("inputs: " + ", ".join(f"{n} ({s.role}, {s.kind}, {s.domain})" for n, s in rule.inputs.items()), file=out)
    if source:
        print("\n" + rule.kernel_source("triton"), file=out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = verify(obj, steps=steps)
    show(caught)
    print(report, file=out)
    return 0 if report.ok else 4 if report.inconclusive and not report.no_minimum else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="olssm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="derive every catalogue objective, check it, print the table")
    t.add_argument("--latex", action="store_true", help="LaTeX instead of markdown (the catalogue's rows only)")
    t.add_argument("--steps", type=_steps, default=6, help="steps of the numerical-solver check")
    d = sub.add_parser("derive", help="derive your own objective (FILE.py:NAME or module:NAME), print the rule, "
                                      "check it against the numerical solver")
    d.add_argument("objective", help="FILE.py:NAME or package.module:NAME: an Objective, or a function returning one")
    d.add_argument("--latex", action="store_true", help="the rule in LaTeX")
    d.add_argument("--steps", type=_steps, default=6, help="steps of the numerical-solver check")
    d.add_argument("--source", action="store_true", help="also print the generated Triton kernel source")
    args = p.parse_args(argv)
    if args.cmd == "table":
        rows = table(latex=args.latex, steps=args.steps)
        return 0 if all(r["ok"] for r in rows) else 1
    if args.cmd == "derive":
        return derive_command(args.objective, latex=args.latex, steps=args.steps, source=args.source)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:   # `python -m olssm derive F:X --source | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (Python's flush at exit would raise again)
        sys.exit(1)
