"""``python -m lightgen.convert export ckpt=<run or .ckpt> to=official|diffusers out=<path> [use_ema=true]``

Arguments are ``key=value`` pairs (no Hydra). Bad input exits with status 2 and one sentence on
stderr naming the problem and the fix; nothing is written then. See :mod:`lightgen.convert.export`.
"""

from __future__ import annotations

import sys

from lightgen.utils.errors import LightgenConfigError, first_line

USAGE = (
    "usage: python -m lightgen.convert export ckpt=<lightgen run or .ckpt> to=official|diffusers out=<path> "
    "[use_ema=true|false]"
)
KEYS = {"ckpt": True, "to": True, "out": True, "use_ema": False}  # key -> required
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_export_args(args: list[str]) -> dict:
    """``key=value`` pairs -> kwargs of :func:`lightgen.convert.export.export`; one sentence when they are wrong."""
    values: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            raise LightgenConfigError(f"unknown argument {arg!r}; pass {', '.join(f'{k}=' for k in KEYS)} ({USAGE}).")
        if key in values:
            raise LightgenConfigError(f"{key}= is given twice; pass it once.")
        values[key] = value
    missing = [k for k, required in KEYS.items() if required and not values.get(k)]
    if missing:
        names = ", ".join(f"{k}=" for k in missing)
        raise LightgenConfigError(f"{names} {'is' if len(missing) == 1 else 'are'} missing; {USAGE}.")
    use_ema = BOOLS.get(values.get("use_ema", "true").lower())
    if use_ema is None:
        raise LightgenConfigError(f"use_ema={values['use_ema']} is not a boolean; pass use_ema=true or use_ema=false.")
    if values["to"] not in ("official", "diffusers"):
        raise LightgenConfigError(f"to={values['to']} is not an export format; pass to=official or to=diffusers.")
    return {"ckpt": values["ckpt"], "to": values["to"], "out": values["out"], "use_ema": use_ema}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    try:
        if command != "export":
            raise LightgenConfigError(f"unknown command {command!r}; the command is export ({USAGE}).")
        kwargs = parse_export_args(args)
        from lightgen.convert.export import export

        path = export(**kwargs)
    except LightgenConfigError as e:
        print(f"lightgen.convert: {first_line(e)}", file=sys.stderr, flush=True)
        return 2
    print(f"lightgen.convert: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
