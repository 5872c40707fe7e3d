"""The command line every job shares: --config, --print-config, dotted overrides, and a run under stop signals.

A job declares the settings it does not use; setting one of them is an error (exit 2) naming the dotted key, and
--help and --print-config show only the keys the job honours. The config is read and checked before torch is
imported, so a wrong key fails in well under two seconds.
"""

import argparse
import dataclasses
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

from osp_megatron.config.errors import ConfigError
from osp_megatron.config.loader import apply_override_layer, from_dict, load_yaml, to_dict

# Sampling settings only osp-sample and osp-eval read: the training jobs' sample videos render sample.prompt in
# the training precision, one video per prompt.
SAMPLE_RUN_ONLY = (
    "sample.precision",
    "sample.output_dir",
    "sample.prompt_file",
    "sample.videos_per_prompt",
    "sample.batch_size",
    "sample.cfg_parallel",
    "sample.frames",
)


@dataclass(frozen=True)
class JobSpec:
    """What a job's command line needs to know about the job.

    ignored: dotted keys or sections ("data", "sample.frames") the job does not read; a value other than the
    default there is refused. build(config) returns an object with train(stop) and logging_rank;
    summary(result) the text after "finished at step N".
    """

    name: str
    config_class: type
    description: str
    examples: str
    default_config: str  # file name under osp_megatron/configs
    ignored: tuple[str, ...] = ()
    build: Callable | None = None
    summary: Callable | None = None
    extra_arguments: tuple = field(default_factory=tuple)

    def is_ignored(self, dotted: str) -> bool:
        parts = dotted.split(".")
        return any(".".join(parts[:n]) in self.ignored for n in range(1, len(parts) + 1))


def packaged_config(name: str = "tiny_t2v.yaml"):
    from importlib import resources

    return resources.files("osp_megatron") / "configs" / name


def _leaves(data, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict (a mapping value is a section, not a leaf)."""
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            yield from _leaves(value, dotted)
        else:
            yield dotted, value


def _without(data: dict, spec: JobSpec, prefix: str = "") -> dict:
    """`data` without the keys the job ignores."""
    kept = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if spec.is_ignored(dotted):
            continue
        kept[key] = _without(value, spec, dotted) if isinstance(value, dict) else value
    return kept


def _lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def check_ignored_settings(raw: dict, config, spec: JobSpec) -> None:
    """Refuse any setting in `raw` (the YAML plus overrides) that the job does not use and that differs from
    what the job would have without it (its default, or the value derived from the settings it does use)."""
    reference = to_dict(from_dict(spec.config_class, _without(raw, spec)))
    resolved = to_dict(config)
    for dotted, _ in _leaves(raw):
        if spec.is_ignored(dotted) and _lookup(resolved, dotted) != _lookup(reference, dotted):
            raise ConfigError(
                f"{dotted}: {spec.name} does not use this setting (it would be ignored); remove it "
                f"or leave it at its default ({_as_written(_lookup(reference, dotted))})"
            )


def _as_written(value) -> str:
    import json

    return json.dumps(value) if value is None or isinstance(value, (bool, list, dict)) else str(value)


def load_job_config(spec: JobSpec, path=None, overrides=()):
    """The job's config from a YAML file (default: the packaged one) plus dotted overrides, validated, with
    settings the job ignores refused."""
    raw = load_yaml(path if path is not None else packaged_config(spec.default_config))
    apply_override_layer(spec.config_class, raw, overrides)
    config = from_dict(spec.config_class, raw)
    check_ignored_settings(raw, config, spec)
    return config


def honoured_dict(config, spec: JobSpec) -> dict:
    """The resolved config as a nested dict, keys the job ignores left out."""
    return _without(to_dict(config), spec)


def config_sections_help(spec: JobSpec) -> str:
    """Every config section with the keys this job honours, read off the job's config dataclasses."""
    lines = ["config sections and keys (override any as section.key=value; unknown keys are errors):"]
    for section in dataclasses.fields(spec.config_class):
        if spec.is_ignored(section.name):
            continue
        section_type = _dataclass_of(section.type)
        keys = ", ".join(
            f.name
            for f in dataclasses.fields(section_type)
            if f.init and not spec.is_ignored(f"{section.name}.{f.name}")
        )
        lines.extend(
            textwrap.wrap(f"{section.name}: {keys}", width=108, initial_indent="  ", subsequent_indent="      ")
        )
    return "\n".join(lines)


def _dataclass_of(annotation):
    """The dataclass of a section annotation (Optional[LoraConfig] -> LoraConfig)."""
    import typing

    if dataclasses.is_dataclass(annotation):
        return annotation
    for argument in typing.get_args(annotation):
        if dataclasses.is_dataclass(argument):
            return argument
    raise TypeError(f"config section type {annotation!r} holds no dataclass")


def build_parser(spec: JobSpec) -> argparse.ArgumentParser:
    """--config, --print-config, dotted overrides, and the job's own flags (spec.extra_arguments)."""
    parser = argparse.ArgumentParser(
        prog=spec.name,
        description=spec.description,
        epilog=config_sections_help(spec) + "\n\n" + spec.examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help=f"YAML config file (default: the packaged example, examples/{spec.default_config})",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the fully resolved config (after overrides; the keys this job uses) as YAML and exit",
    )
    for flags, options in spec.extra_arguments:
        parser.add_argument(*flags, **options)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def job_main(spec: JobSpec, argv=None, actions: dict | None = None) -> int:
    """Parse, load and check the config (before torch is imported), then print it, run one of `actions`
    ({flag attribute: action(config) -> exit status}, e.g. --estimate-memory) or run the job."""
    parser = build_parser(spec)
    args = parser.parse_args(argv)
    try:
        config = load_job_config(spec, args.config, args.overrides)
    except ConfigError as err:
        print(f"{spec.name}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(honoured_dict(config, spec), sort_keys=False))
        return 0
    for attribute, action in (actions or {}).items():
        if getattr(args, attribute, False):
            return action(config)
    return run(config, spec)


def run(config, spec: JobSpec) -> int:
    """Build and train under graceful-stop signal handling; exit status 0 also when stopped by a signal."""
    from osp_megatron.engine.signals import GracefulStop
    from osp_megatron.utils.logging import plain_warnings

    plain_warnings(spec.name)
    with GracefulStop(job=spec.name) as stop:
        trainer = None
        try:
            trainer = spec.build(config)
            result = trainer.train(stop)
        except ConfigError as err:
            print(f"{spec.name}: error: {err}", file=sys.stderr)
            return 2
        finally:
            from osp_megatron.parallel.state import destroy_distributed

            destroy_distributed()
    if trainer.logging_rank and result["status"] == "finished":
        text = spec.summary(result) if spec.summary is not None else f"loss {result['loss']:.4f}"
        print(f"[{spec.name}] finished at {getattr(trainer, 'unit', 'step')} {result['step']} ({text})", flush=True)
    return 0
