"""``import pixeldiffusion as pd``: every name in ``pd.__all__`` is the function or class it says,
whatever else has been imported (a submodule of the same name must not replace it)."""

import importlib
import inspect
import pkgutil
import types

import pytest

import pixeldiffusion as pd

# name in pd.__all__ -> the module that defines it
EXPECTED = {
    "sample": "samplers", "SAMPLERS": "samplers", "make_denoiser": "samplers",
    "load_checkpoint": "checkpoint", "load_config": "config", "Config": "config",
    "train": "run", "alphas_cumprod_of": "schedule", "generate": "generate",
    "UNet": "unet", "build_unet": "unet", "bridge_for": "formulations",
}
OPTIONAL = ("fastapi", "uvicorn", "diffusers", "torch_fidelity", "matplotlib")


def import_every_submodule() -> list[str]:
    """Import each module of the package; skip those whose optional dependency is missing."""
    imported = []
    for info in pkgutil.walk_packages(pd.__path__, prefix="pixeldiffusion."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as err:
            if err.name and err.name.split(".")[0] in OPTIONAL:
                continue
            raise
        imported.append(info.name)
    return imported


def test_public_names_stay_what_they_are_after_every_submodule_is_imported():
    imported = import_every_submodule()
    assert {"pixeldiffusion.generate", "pixeldiffusion.train"} <= set(imported)
    assert set(pd.__all__) == {"__version__", *EXPECTED}
    for name, module in EXPECTED.items():
        value = getattr(pd, name)
        assert not isinstance(value, types.ModuleType), name
        if name == "SAMPLERS":
            assert value is importlib.import_module("pixeldiffusion.samplers").SAMPLERS
            continue
        assert callable(value) and (inspect.isfunction(value) or inspect.isclass(value)), name
        assert value.__module__ == f"pixeldiffusion.{module}", (name, value.__module__)
        assert value is getattr(importlib.import_module(f"pixeldiffusion.{module}"), name)
    assert isinstance(pd.__version__, str)


def test_from_imports_and_the_submodules_themselves():
    from pixeldiffusion import generate, train
    assert inspect.isfunction(generate) and inspect.isfunction(train)
    generate_module = importlib.import_module("pixeldiffusion.generate")
    assert isinstance(generate_module, types.ModuleType)
    assert generate_module.generate is pd.generate
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = pd.nope
