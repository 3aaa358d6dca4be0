"""The command line, derived from the configuration dataclasses (never written by hand).

Every dataclass field becomes one flag: `--` + the field name with dashes (Megatron's names), or
`metadata["flag"]`; its help is the field's doc string (the string literal right after the field,
read from the source with `ast`) plus its default. Nested dataclass fields become argument
groups. Flags default to "not given" (argparse.SUPPRESS), so a script can start from a preset and
apply only what the user typed on top of it (`apply_overrides`) - no `args.x or default` chains,
and `--eval-interval 0` or `--lr 0` mean 0.

Tools share the same flags through `add_field_argument` / `add_layout_arguments`, so a tool's
`--tensor-model-parallel-size` or `--load` reads exactly like the trainer's.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing
from typing import Any, Optional

from megaglot.config.model import ModelConfig, get_model_preset
from megaglot.config.parallel import ParallelConfig
from megaglot.config.train import CheckpointConfig, DataConfig, TrainConfig


def field_docs(cls) -> dict:
    """{field name: its one-line doc} from the string literal that follows each field in `cls`'s source.

    Attribute doc strings are not kept at run time, so they are read from the source (a few ms)."""
    tree = ast.parse(inspect.getsource(cls).lstrip())
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _scalar_type(hint) -> tuple:
    """(element type, optional?, list?) of a field's annotation: int, Optional[int], Optional[list]..."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    is_list = hint is list or typing.get_origin(hint) is list
    return (str if is_list else hint), optional, is_list


def _converter(kind, optional: bool, flag: str):
    """A type= function: `kind(text)`, 'none' -> None for optional fields, one clear line otherwise."""
    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects {kind.__name__}, got {text!r}") from None
    convert.__name__ = kind.__name__
    return convert


def _help(cls, f: dataclasses.Field, shown_default: Any) -> str:
    doc = field_docs(cls).get(f.name, "")
    return f"{doc} (default: {shown_default})".replace("%", "%%")


def add_field_argument(group, cls, name: str, *, dest: Optional[str] = None, shown_default: Any = None,
                       default: Any = argparse.SUPPRESS, flag: Optional[str] = None, **kwargs) -> None:
    """One flag for `cls.name`: its type, choices, doc and default come from the dataclass field.

    default: what argparse stores when the flag is absent (SUPPRESS: nothing, so presets apply);
    shown_default: what --help says the default is (the field's default unless given); flag: another
    spelling than the field's (a tool's --target-* layout)."""
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    flag, dest = flag or flag_of(f), dest or name
    shown = _default_of(f) if shown_default is None else shown_default
    kwargs.setdefault("help", _help(cls, f, shown))
    if hint is bool:
        action = "store_true" if not _default_of(f) else argparse.BooleanOptionalAction
        group.add_argument(flag, dest=dest, action=action, default=default, **kwargs)
        return
    kind, optional, is_list = _scalar_type(hint)
    if "choices" in f.metadata:  # an optional field also takes 'none'
        kwargs.setdefault("choices", (*f.metadata["choices"], *(["none"] if optional else [])))
    else:
        kwargs.setdefault("type", _converter(kind, optional, flag))
        kwargs.setdefault("metavar", name.upper())
    if is_list:
        kwargs.setdefault("nargs", "+")
    group.add_argument(flag, dest=dest, default=default, **kwargs)
    for alias, value in f.metadata.get("aliases", {}).items():
        group.add_argument(alias, dest=dest, action="store_const", const=value, default=default,
                           help=f"same as {flag} {value}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, prefix: str, title: str,
                            shown_defaults: Optional[dict] = None) -> None:
    """A group of flags for every field of `cls` (nested dataclasses: a group each), dest 'prefix.field'."""
    group = parser.add_argument_group(title, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    nested = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append(f)
            continue
        dest = f"{prefix}.{f.name}"
        add_field_argument(group, cls, f.name, dest=dest, shown_default=(shown_defaults or {}).get(dest))
    for f in nested:
        add_dataclass_arguments(parser, hints[f.name], f"{prefix}.{f.name}", f.name, shown_defaults)


def add_config_arguments(parser: argparse.ArgumentParser, shown_defaults: Optional[dict] = None) -> None:
    """Flags for every field of ModelConfig (dest 'model.*'), ParallelConfig ('parallel.*') and
    TrainConfig with its sections ('train.*'). Model fields default to the --model preset's values."""
    model_defaults = {f"model.{f.name}": "the --model preset's" for f in dataclasses.fields(ModelConfig)}
    add_dataclass_arguments(parser, ModelConfig, "model", "model", {**model_defaults, **(shown_defaults or {})})
    add_dataclass_arguments(parser, ParallelConfig, "parallel", "parallel layout", shown_defaults)
    add_dataclass_arguments(parser, TrainConfig, "train", "training", shown_defaults)


def given(namespace: argparse.Namespace) -> dict:
    """The flags the user typed, nested by dest: {'train': {'optimizer': {'lr': 0.0}}, ...}."""
    out: dict = {}
    for dest, value in vars(namespace).items():
        node = out
        *path, leaf = dest.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def apply_overrides(config, overrides: dict):
    """A copy of `config` with `overrides` (nested dicts for nested dataclasses) replacing its fields."""
    changes = {}
    for name, value in overrides.items():
        current = getattr(config, name)
        changes[name] = apply_overrides(current, value) if dataclasses.is_dataclass(current) else value
    return dataclasses.replace(config, **changes)


def with_fields(config, **values):
    """A copy of `config` with fields set by their plain name wherever they live in its sections
    (`with_fields(train, lr=0.1, save="ckpt")` sets train.optimizer.lr and train.checkpoint.save):
    names are unique across a config's sections, so scripts and tests need not spell the nesting."""
    return apply_overrides(config, _route(type(config), values))


def _route(cls, values: dict) -> dict:
    hints = typing.get_type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    routed = {k: v for k, v in values.items() if k in own}
    rest = {k: v for k, v in values.items() if k not in own}
    for f in dataclasses.fields(cls):
        if rest and dataclasses.is_dataclass(hints[f.name]):
            inner = {k for k in rest if k in _all_names(hints[f.name])}
            if inner:
                routed[f.name] = _route(hints[f.name], {k: rest.pop(k) for k in inner})
    if rest:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(rest))}")
    return routed


def _all_names(cls) -> set:
    hints = typing.get_type_hints(cls)
    names = set()
    for f in dataclasses.fields(cls):
        names |= _all_names(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else {f.name}
    return names


def configs_from_args(namespace: argparse.Namespace, model: str, parallel: ParallelConfig,
                      train: TrainConfig) -> tuple:
    """(ModelConfig, ParallelConfig, TrainConfig): the preset `model` / `parallel` / `train`, then the
    user's flags on top. The model's fields go into the preset before construction (FFN = 4h follows)."""
    flags = given(namespace)
    model_flags = dict(flags.get("model", {}))
    name = model_flags.pop("name", model)
    return (get_model_preset(name, **model_flags), apply_overrides(parallel, flags.get("parallel", {})),
            apply_overrides(train, flags.get("train", {})))


#: The layout a tool writes (tools/reshard_checkpoint.py), in the names of Megatron's checkpoint converter.
TARGET_LAYOUT_FLAGS = {"tensor_model_parallel_size": "--target-tensor-parallel-size",
                       "pipeline_model_parallel_size": "--target-pipeline-parallel-size",
                       "num_layers_per_virtual_pipeline_stage": "--target-num-layers-per-virtual-pipeline-stage"}


def add_layout_arguments(parser, virtual: bool = False, target: bool = False) -> None:
    """--tensor-model-parallel-size / --pipeline-model-parallel-size (and the virtual stage size) with
    ParallelConfig's defaults and docs, for tools: dest is the field name (args.tensor_model_parallel_size).
    target: the layout to write, spelled TARGET_LAYOUT_FLAGS, TP and PP required."""
    group = parser.add_argument_group("target layout" if target else "parallel layout")
    names = ["tensor_model_parallel_size", "pipeline_model_parallel_size"]
    for name in names + (["num_layers_per_virtual_pipeline_stage"] if virtual else []):
        default = {f.name: f.default for f in dataclasses.fields(ParallelConfig)}[name]
        if target:
            required = {"required": True, "shown_default": "required"} if name in names else {}
            add_field_argument(group, ParallelConfig, name, default=None if required else default,
                               flag=TARGET_LAYOUT_FLAGS[name], metavar="N", **required)
        else:
            add_field_argument(group, ParallelConfig, name, default=default)


def add_inference_arguments(parser, source) -> None:
    """What the tools that load a model share: --load (into the `source` group, beside --hf-dir), and
    --tokenizer, the layout, --precision (--bf16/--fp16) and --attention-backend, as the trainer spells them."""
    add_field_argument(source, CheckpointConfig, "load", default=None,
                       help="megaglot checkpoint root (follows 'latest') or iteration directory")
    group = parser.add_argument_group("model loading")
    add_field_argument(group, DataConfig, "tokenizer", default=None,
                       help="tokenizer.json or its directory (default: the one the checkpoint records)")
    add_field_argument(group, TrainConfig, "precision", default="fp32", shown_default="fp32")
    add_field_argument(group, ModelConfig, "attention_backend", default=None, shown_default="the checkpoint's")
    add_layout_arguments(parser)
