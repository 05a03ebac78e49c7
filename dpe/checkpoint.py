"""Official DPE checkpoints (``dpe.pt``) and the project's own checkpoints.

Official files hold the generator state dict under ``gen`` (and, for training snapshots, the
discriminator under ``dis``). Official names map onto ours by prefix (see :data:`OFFICIAL_PREFIXES`);
a file whose keys or shapes do not match the model is refused with a ``ValueError`` that names
the offending keys.

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

CHECKPOINT_FORMAT = "dpe-portrait/1"


def official_to_ours(key: str) -> str | None:
    for theirs, ours in OFFICIAL_PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def ours_to_official(key: str) -> str | None:
    for theirs, ours in OFFICIAL_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return None


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
                     f"DPE checkpoint with the generator under 'gen'")


def _read_official(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[Any, str]:
    """The checkpoint's content and a name for it in messages."""
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict, "state dict"
    return _torch_load(path_or_state_dict), str(path_or_state_dict)


def load_official_generator(path_or_state_dict: str | os.PathLike | Mapping[str, Any], model: nn.Module) -> nn.Module:
    """Load official DPE generator weights (``dpe.pt`` or its ``gen`` dict) into a ``DPEGenerator``.

    Refuses (``ValueError``) files whose keys or shapes differ from the model's; nothing is
    copied in that case.
    """
    obj, source = _read_official(path_or_state_dict)
    official = _official_section(obj, "gen", source)
    mapped: dict[str, Any] = {}
    unknown: list[str] = []
    for k, v in official.items():
        ours = official_to_ours(k)
        if ours is None:
            unknown.append(k)
        else:
            mapped[ours] = v
    model = _unwrap(model)
    expected = model.state_dict()
    to_official = lambda k: ours_to_official(k) or k  # noqa: E731
    given = dict(mapped)
    for k in unknown:
        given[k] = official[k]
    check_state_dict(expected, given, f"{source} (generator)", name_of=to_official)
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in mapped.items()}, strict=True)
    return model


def load_official_discriminator(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                                model: nn.Module) -> nn.Module:
    """Load the official discriminator (``dis`` entry, or ``disc``; names are identical to ours)."""
    obj, source = _read_official(path_or_state_dict)
    section = "disc" if isinstance(obj, Mapping) and "disc" in obj and "dis" not in obj else "dis"
    if isinstance(obj, Mapping) and "gen" in obj and section not in obj:
        raise ValueError(f"{source}: holds no discriminator ('dis'); the released dpe.pt has only the "
                         "generator: train the discriminator from scratch or use a training snapshot")
    official = _official_section(obj, section, source)
    model = _unwrap(model)
    expected = model.state_dict()
    check_state_dict(expected, official, f"{source} (discriminator)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in official.items()}, strict=True)
    return model


# ------------------------------------------------------------------------------ own checkpoints
def save_checkpoint(path: str | os.PathLike, *, models: Mapping[str, nn.Module] | None = None,
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None, step: int = 0,
                    config: ModelConfig | Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{format, step, config, models, optimizers, extra}`` atomically.

    ``models``/``optimizers`` map names (e.g. ``generator``, ``discriminator``) to modules and
    optimisers; the file holds their state dicts. ``extra`` must hold plain data only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
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
