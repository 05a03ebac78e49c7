"""Official DPE checkpoints (``dpe.pt``), LIA's ``vox.pt``, and the project's own checkpoints.

Official files hold the generator state dict under ``gen`` (and, for training snapshots, the
discriminator under ``dis``). Official names map onto ours by prefix (see :data:`OFFICIAL_PREFIXES`);
a file whose keys or shapes do not match the model is refused with a ``ValueError`` that names
the offending keys, and nothing is copied.

* ``load_official_generator`` / ``load_official_discriminator``: one network each (inference).
* ``initialise_from_official``: a trainer's start from an official file: the generator, and the
  discriminator when the file has one; optimiser states are not taken (Adam starts afresh).
* ``load_lia_initialisation``: the official DPE trainer's start from LIA's ``vox.pt``
  (wyhsirius/LIA): its encoder, motion MLP and direction matrix, nothing else
  (:data:`LIA_PREFIXES`).
* ``export_official_generator``: our generator as ``{'gen': ...}`` with the official names,
  order and shapes, readable by the official code.

Our own checkpoints are plain dicts of tensors, numbers, strings and dicts, written atomically
(temp file in the same folder, then ``os.replace``) and readable with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import ModelConfig

# official prefix -> our prefix (first match wins; every official key starts with one of them)
OFFICIAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("enc.net_app.", "encoder."),
    ("dec_pose.", "expression_generator."),
    ("dec_exp.", "pose_generator."),
    ("mlp_pose.", "expression_head."),
    ("mlp_exp.", "pose_head."),
    ("mlp.", "motion.mlp."),
    ("dir.", "motion.directions."),
)

# LIA generator prefix -> our prefix: what the official DPE trainer copies from vox.pt (its
# ``Trainer.resume``): LIA's appearance encoder, its motion MLP (``enc.fc``, official ``mlp``) and the
# direction matrix of its single decoder (``dec.direction``, official ``dir``).
LIA_PREFIXES: tuple[tuple[str, str], ...] = (
    ("enc.net_app.", "encoder."),
    ("enc.fc.", "motion.mlp."),
    ("dec.direction.", "motion.directions."),
)

CHECKPOINT_FORMAT = "dpe-portrait/1"


def _rename(key: str, prefixes: tuple[tuple[str, str], ...], to_ours: bool) -> str | None:
    for theirs, ours in prefixes:
        old, new = (theirs, ours) if to_ours else (ours, theirs)
        if key.startswith(old):
            return new + key[len(old):]
    return None


def official_to_ours(key: str) -> str | None:
    return _rename(key, OFFICIAL_PREFIXES, to_ours=True)


def ours_to_official(key: str) -> str | None:
    return _rename(key, OFFICIAL_PREFIXES, to_ours=False)


def _torch_load(path: str | os.PathLike) -> Any:
    # Official training snapshots also pickle their argparse.Namespace; allow exactly that class.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError and friends
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True): {exc}. Only plain tensor "
            "checkpoints are accepted; re-save the state dict alone (torch.save({'gen': sd}, path))."
        ) from exc


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: {shown}{more}"


_OFFICIAL_HINT = ("Check that the file is the official DPE checkpoint (dpe.pt: size 256, style dim 512, "
                  "motion dim 20, channel multiplier 1) and that the model uses the matching ModelConfig "
                  "(ModelConfig() for dpe.pt).")
_OWN_HINT = ("Build the model from the checkpoint's own config (config_from_checkpoint(payload)) before "
             "loading, or start from a checkpoint written for this configuration.")


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any], what: str,
                     name_of=lambda k: k, hint: str = _OFFICIAL_HINT) -> None:
    """Raise ``ValueError`` naming missing / unexpected / mis-shaped keys (names via ``name_of``)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = []
    for k, ref in expected.items():
        if k in given:
            v = given[k]
            if not isinstance(v, torch.Tensor):
                mismatched.append(f"{name_of(k)} (not a tensor: {type(v).__name__})")
            elif tuple(v.shape) != tuple(ref.shape):
                mismatched.append(f"{name_of(k)} {tuple(v.shape)} != expected {tuple(ref.shape)}")
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append("missing keys " + _describe([name_of(k) for k in missing]))
        if unexpected:
            parts.append("unexpected keys " + _describe([name_of(k) for k in unexpected]))
        if mismatched:
            parts.append("shape mismatches " + _describe(mismatched))
        raise ValueError(f"{what} does not match the model: " + "; ".join(parts) + ". " + hint)


def _official_section(obj: Any, section: str, source: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping) and section in obj and isinstance(obj[section], Mapping):
        return obj[section]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj  # a bare state dict
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"{source}: no '{section}' state dict found (top level: {keys}); expected an official "
                     f"DPE checkpoint (or LIA's vox.pt) with the generator under 'gen'")


def _read_official(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[Any, str]:
    """The checkpoint's content and a name for it in messages."""
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict, "state dict"
    return _torch_load(path_or_state_dict), str(path_or_state_dict)


def _discriminator_section_name(obj: Any) -> str:
    return "disc" if isinstance(obj, Mapping) and "disc" in obj and "dis" not in obj else "dis"


def _has_discriminator(obj: Any) -> bool:
    return isinstance(obj, Mapping) and _discriminator_section_name(obj) in obj


def _checked_official_generator(obj: Any, source: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's generator under our names and dtypes, refused unless it matches ``model`` exactly."""
    official = _official_section(obj, "gen", source)
    expected = model.state_dict()
    given = {official_to_ours(k) or k: v for k, v in official.items()}  # unknown names stay as they are
    check_state_dict(expected, given, f"{source} (generator)", name_of=lambda k: ours_to_official(k) or k)
    return {k: v.to(expected[k].dtype) for k, v in given.items()}


def _checked_official_discriminator(obj: Any, source: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's discriminator (names are identical to ours), refused unless it matches ``model``."""
    if isinstance(obj, Mapping) and "gen" in obj and not _has_discriminator(obj):
        raise ValueError(f"{source}: holds no discriminator ('dis'); the released dpe.pt has only the "
                         "generator: train the discriminator from scratch or use a training snapshot")
    official = _official_section(obj, _discriminator_section_name(obj), source)
    expected = model.state_dict()
    check_state_dict(expected, official, f"{source} (discriminator)")
    return {k: v.to(expected[k].dtype) for k, v in official.items()}


def load_official_generator(path_or_state_dict: str | os.PathLike | Mapping[str, Any], model: nn.Module) -> nn.Module:
    """Load official DPE generator weights (``dpe.pt`` or its ``gen`` dict) into a ``DPEGenerator``.

    Refuses (``ValueError``) files whose keys or shapes differ from the model's; nothing is
    copied in that case.
    """
    obj, source = _read_official(path_or_state_dict)
    model = _unwrap(model)
    model.load_state_dict(_checked_official_generator(obj, source, model), strict=True)
    return model


def load_official_discriminator(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                                model: nn.Module) -> nn.Module:
    """Load the official discriminator (``dis`` entry, or ``disc``; names are identical to ours)."""
    obj, source = _read_official(path_or_state_dict)
    model = _unwrap(model)
    model.load_state_dict(_checked_official_discriminator(obj, source, model), strict=True)
    return model


def initialise_from_official(path_or_state_dict: str | os.PathLike | Mapping[str, Any], generator: nn.Module,
                             discriminator: nn.Module | None = None) -> list[str]:
    """Start training from an official file; returns what was loaded (``["generator", "discriminator"]``).

    The generator always comes from ``gen``; the discriminator from ``dis`` when the file has one
    (training snapshots do, the released ``dpe.pt`` does not: then it keeps its initialisation).
    Both are checked before either is copied. Optimiser states are not taken: ours hold only the
    trainable parameters, so the official Adam moments would not line up.
    """
    obj, source = _read_official(path_or_state_dict)
    generator = _unwrap(generator)
    states = {"generator": (generator, _checked_official_generator(obj, source, generator))}
    if discriminator is not None and _has_discriminator(obj):
        discriminator = _unwrap(discriminator)
        states["discriminator"] = (discriminator, _checked_official_discriminator(obj, source, discriminator))
    for model, state in states.values():
        model.load_state_dict(state, strict=True)
    return list(states)


_LIA_HINT = ("Expected LIA's vox.pt (wyhsirius/LIA: the generator under 'gen' with enc.net_app.*, enc.fc.* "
             "and dec.direction.weight) for a model of the same size, style dim and motion dim "
             "(ModelConfig() for vox.pt). An official DPE checkpoint is read with initialise_from_official.")


def load_lia_initialisation(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                            generator: nn.Module) -> list[str]:
    """Initialise from LIA's ``vox.pt`` as the official DPE trainer does; returns our keys that were set.

    Copies LIA's appearance encoder to ``encoder`` (its blur-kernel buffers included), ``enc.fc``
    to ``motion.mlp`` and ``dec.direction`` to ``motion.directions``, nothing else: LIA's single
    decoder, discriminator and optimiser states are ignored, the two heads and two generators keep
    their initialisation. A file that lacks one of these parts, has extra keys under their
    prefixes or other shapes is refused (``ValueError`` naming the LIA keys); nothing is copied then.
    """
    obj, source = _read_official(path_or_state_dict)
    lia = _official_section(obj, "gen", source)
    model = _unwrap(generator)
    expected = {k: v for k, v in model.state_dict().items() if _rename(k, LIA_PREFIXES, to_ours=False)}
    given = {}
    for key, value in lia.items():
        ours = _rename(key, LIA_PREFIXES, to_ours=True)
        if ours is not None:
            given[ours] = value
    check_state_dict(expected, given, f"{source} (LIA generator)",
                     name_of=lambda k: _rename(k, LIA_PREFIXES, to_ours=False) or k, hint=_LIA_HINT)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in given.items()}, strict=False)
    return list(expected)


def export_official_generator(generator: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``{'gen': state dict}`` with the official names, order and shapes, atomically.

    The official code (``Generator.load_state_dict(torch.load(path)['gen'])``) and
    :func:`load_official_generator` read it; tensors are saved on the CPU.
    """
    state = {}
    for key, value in _unwrap(generator).state_dict().items():
        official = ours_to_official(key)
        if official is None:
            raise ValueError(f"{key} has no official name; export_official_generator takes a DPEGenerator")
        state[official] = value.detach().cpu()
    return _atomic_torch_save({"gen": state}, Path(path))


# ------------------------------------------------------------------------------ own checkpoints
def save_checkpoint(path: str | os.PathLike, *, models: Mapping[str, nn.Module] | None = None,
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None, step: int = 0,
                    config: ModelConfig | Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None, durable: bool = True) -> Path:
    """Write ``{format, step, config, models, optimizers, extra}`` atomically.

    ``models``/``optimizers`` map names (e.g. ``generator``, ``discriminator``) to modules and
    optimisers; the file holds their state dicts. ``extra`` must hold plain data only.
    ``durable=False`` skips the fsync: for a staging copy that is uploaded (atomically) elsewhere.
    """
    if isinstance(config, ModelConfig):
        config = config.to_dict()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "config": dict(config) if config is not None else None,
        "models": {name: _unwrap(m).state_dict() for name, m in (models or {}).items()},
        "optimizers": {name: o.state_dict() for name, o in (optimizers or {}).items()},
        "extra": dict(extra or {}),
    }
    return _atomic_torch_save(payload, Path(path), durable)


def _atomic_torch_save(payload: Any, path: Path, durable: bool = True) -> Path:
    """``torch.save`` to a temp file in the same folder, then ``os.replace``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _unwrap(m: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers so keys carry no ``module.`` / ``_orig_mod.`` prefix."""
    while True:
        if hasattr(m, "module") and isinstance(m.module, nn.Module):
            m = m.module
        elif hasattr(m, "_orig_mod") and isinstance(m._orig_mod, nn.Module):
            m = m._orig_mod
        else:
            return m


def load_checkpoint(path: str | os.PathLike, *, models: Mapping[str, nn.Module] | None = None,
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    State is loaded into the given ``models``/``optimizers`` (by name; shapes are checked and a
    mismatch raises ``ValueError``). Returns the payload (``step``, ``config``, ``extra``, ...).
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (official dpe.pt files are read "
                         "with load_official_generator)")
    for name, model in (models or {}).items():
        if name not in payload["models"]:
            raise ValueError(f"{path}: no model '{name}' (has {sorted(payload['models'])})")
        target = _unwrap(model)
        check_state_dict(target.state_dict(), payload["models"][name], f"{path} model '{name}'", hint=_OWN_HINT)
        target.load_state_dict(payload["models"][name])
    for name, opt in (optimizers or {}).items():
        if name not in payload["optimizers"]:
            raise ValueError(f"{path}: no optimizer '{name}' (has {sorted(payload['optimizers'])})")
        opt.load_state_dict(payload["optimizers"][name])
    return dict(payload)


def config_from_checkpoint(payload: Mapping[str, Any]) -> ModelConfig | None:
    cfg = payload.get("config")
    return None if cfg is None else ModelConfig.from_dict(cfg)
