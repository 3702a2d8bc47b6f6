"""Option parsing for `kimi-trt convert` (kept out of cli.py so the command stays thin)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import click
from pydantic import ValidationError

from kimi_trt.config import Parallelism, WeightFormat, WeightFormats
from kimi_trt.errors import ConfigError, UserError


def parse_parallelism(
    tp: int, ep: int | None, moe_tp: int | None, attention_dp: bool
) -> Parallelism:
    """--tp/--ep/--moe-tp with the missing one derived (ep * moe_tp must equal tp)."""
    if ep is None and moe_tp is None:
        ep, moe_tp = tp, 1
    elif ep is None or moe_tp is None:
        given, flag = (moe_tp, "--moe-tp") if ep is None else (ep, "--ep")
        if given < 1 or tp % given:
            raise ConfigError(f"{flag} {given} must divide --tp {tp}: ep x moe_tp must equal tp")
        ep, moe_tp = (tp // given, given) if ep is None else (given, tp // given)
    try:
        return Parallelism(tp=tp, ep=ep, moe_tp=moe_tp, attention_dp=attention_dp)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        where = ".".join(str(x) for x in err["loc"])
        raise ConfigError(
            f"--tp {tp} --ep {ep} --moe-tp {moe_tp}: {where + ': ' if where else ''}{msg}"
        ) from None


def _accepts(cls: str, fmt: str) -> bool:
    try:
        WeightFormats.model_validate({cls: fmt})
    except ValidationError:
        return False
    return True


def _all_formats(fmt: str) -> dict[str, str]:
    """`all=FMT`: FMT for every class that can take it."""
    taken = {cls: fmt for cls in WeightFormats.model_fields if _accepts(cls, fmt)}
    if not taken:
        raise ConfigError(
            f"--format all={fmt!r}: not a weight format (linear classes take "
            f"{', '.join(get_args(WeightFormat))}; embeddings take bf16 or fp32)"
        )
    return taken


def parse_formats(items: tuple[str, ...]) -> tuple[WeightFormats, list[str]]:
    """CLASS=FORMAT pairs -> (WeightFormats, notes for the summary); unknown class or format:
    one-line error. `all=FMT` sets every class that can take FMT; the others keep their
    default (said in a note). A CLASS=FORMAT given as well wins over all=, in any order."""
    values: dict[str, str] = {}
    all_fmt: str | None = None
    for item in items:
        cls, sep, fmt = item.partition("=")
        if sep and cls == "all":
            all_fmt, values = fmt, _all_formats(fmt)
        elif not sep or cls not in WeightFormats.model_fields:
            raise ConfigError(
                f"--format {item!r}: expected CLASS=FORMAT with CLASS one of "
                f"{', '.join(WeightFormats.model_fields)} or all"
            )
    given = [item.partition("=") for item in items]
    values |= {cls: fmt for cls, _, fmt in given if cls != "all"}
    try:
        formats = WeightFormats.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        cls = err["loc"][0]
        raise ConfigError(f"--format {cls}={values.get(cls)!r}: {err['msg']}") from None
    notes = [
        f"{cls} keeps {formats.for_class(cls)}: it cannot be stored as {all_fmt}"
        for cls in WeightFormats.model_fields
        if all_fmt is not None and cls not in values
    ]
    return formats, notes


def convert_command(
    checkpoint: Path | None,
    out: Path,
    tp: int,
    ep: int | None,
    moe_tp: int | None,
    attention_dp: bool,
    formats: tuple[str, ...],
    verify: bool,
    strict: bool,
    jobs: int | None,
    quiet: bool,
) -> str:
    """Run `kimi-trt convert`; returns the summary to print."""
    from kimi_trt.convert.converter import render_summary, run_conversion
    from kimi_trt.convert.manifest import verify_dir

    if checkpoint is None:
        if not verify:
            raise UserError("--checkpoint is required (or pass --verify to re-check --out)")
        manifest = verify_dir(out)
        n = len(manifest["files"])
        return (
            f"verified {out}: {n} files match manifest.json (config_hash {manifest['config_hash']})"
        )
    weight_formats, notes = parse_formats(formats)
    result = run_conversion(
        checkpoint,
        out,
        parse_parallelism(tp, ep, moe_tp, attention_dp),
        weight_formats,
        strict=strict,
        verify=verify,
        progress=not quiet,
        jobs=jobs,
        warn=lambda s: click.echo(s, err=True),
    )
    return "\n".join([render_summary(result), *(f"  note     {n}" for n in notes)])
