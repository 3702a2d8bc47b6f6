"""`kimi-trt` command line. Each command parses options and calls one stage's function.

Exit codes (DESIGN.md): 0 ok, 2 user error (one line on stderr), 3 missing capability,
1 internal error. User mistakes never print a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kimi_trt.errors import MissingCapability, UserError


class KimiGroup(click.Group):
    """Turns our error types into one line on stderr and the documented exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UserError, MissingCapability) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=KimiGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kimi_trt")
def main() -> None:
    """Kimi-K2 compiled-inference toolchain: HF checkpoint -> per-rank engines -> serving.

    \b
    Typical flow:
      kimi-trt plan  --config build_configs/b200_ep8.yaml
      kimi-trt build --config build_configs/b200_ep8.yaml
      mpirun -np 8 kimi-trt run --engine-dir engines/k2-b200-ep8 --chat "Hello"
    """


@main.command()
@click.option(
    "--preset",
    type=click.Choice(["tiny", "tiny-groups", "small", "k2-shapes"]),
    default="tiny",
    show_default=True,
)
@click.option("--layers", type=int, help="Override num_hidden_layers.")
@click.option("--experts", type=int, help="Override n_routed_experts.")
@click.option("--vocab", type=int, help="Override vocab_size.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any config.json field (JSON value), repeatable.",
)
@click.option("--no-fp8", is_flag=True, help="Write BF16 weights instead of block-FP8.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--quiet", is_flag=True)
def synth(preset, layers, experts, vocab, overrides, no_fp8, seed, out, quiet) -> None:
    """Write a synthetic HF checkpoint laid out exactly like Kimi-K2's (random weights)."""
    from kimi_trt.convert.synth import preset_config, write_synthetic_checkpoint

    extra: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    cfg = preset_config(
        preset, layers=layers, experts=experts, vocab=vocab, fp8=not no_fp8, overrides=extra
    )
    summary = write_synthetic_checkpoint(cfg, out, seed=seed, progress=not quiet)
    click.echo(
        f"wrote {summary['tensors']} tensors, {summary['bytes'] / 1e6:.1f} MB in {summary['files']} files to {out}"
    )


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe an HF checkpoint, a per-rank checkpoint or an engine dir."""
    from kimi_trt.inspect import describe, render

    info = describe(path)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@main.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="Build YAML."
)
@click.option(
    "--model-config",
    type=click.Path(path_type=Path),
    help="config.json to plan with instead of <checkpoint>/config.json (plan before downloading).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(config_path: Path, model_config: Path | None, as_json: bool) -> None:
    """Per-GPU memory plan of a build config, from configs alone (no weights are read).

    \b
    Prints per-rank weight bytes by tensor class, activations, KV cache bytes per token,
    the KV budget and how many max_seq_len sequences fit, the verdict, and the smallest
    layout that fits the configured GPU. Exit 0 when the layout fits, 2 when it does not
    (the reason as one line on stderr) or when a config is missing or invalid.
    """
    from kimi_trt.plan import load_plan, plan_to_dict, render_plan, require_fit

    result = load_plan(config_path, model_config)
    click.echo(json.dumps(plan_to_dict(result), indent=2) if as_json else render_plan(result))
    require_fit(result)


if __name__ == "__main__":
    main()
