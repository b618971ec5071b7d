"""Randomly broken configs either run or stop with one short, clear error; never a traceback."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import yaml

from transfer_lightning.commands.main import main

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
CASES = 24


def leaves(tree: dict, prefix: tuple = ()) -> list[tuple]:
    """Paths of every value in a nested dict."""
    found = []
    for key, value in tree.items():
        found.append((*prefix, key))
        if isinstance(value, dict):
            found.extend(leaves(value, (*prefix, key)))
    return found


def perturb(config: dict, rng: random.Random) -> tuple[dict, str]:
    """One random mutation: a wrong type, a missing key, an unknown key or an out-of-range number."""
    config = copy.deepcopy(config)
    path = rng.choice(leaves(config))
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    value = parent[path[-1]]
    kind = rng.choice(["wrong type", "missing key", "unknown key", "out of range"])
    if kind == "wrong type":
        parent[path[-1]] = rng.choice(["not-a-number", [1, 2], {"x": 1}, 3.5, True])
    elif kind == "missing key":
        del parent[path[-1]]
    elif kind == "unknown key":
        parent[f"{path[-1]}_typo"] = 1
    else:
        parent[path[-1]] = rng.choice([-1, 0, -0.5, 10**9]) if isinstance(value, (int, float)) else -1
    return config, f"{kind} at {'.'.join(map(str, path))}"


@pytest.mark.parametrize("case", range(CASES))
def test_perturbed_config_runs_or_fails_clearly(case, image_folder, run_dir, capsys):
    rng = random.Random(case)
    config = yaml.safe_load(rng.choice(CONFIGS).read_text())
    config["data"] |= {"data_dir": str(image_folder), "cache_dir": str(run_dir / "cache"), "val_size": 20}
    config["data"]["batch_size"] = 16
    config["model"]["weights"] = None
    config["trainer"] |= {"accelerator": "cpu", "devices": 1, "fast_dev_run": True, "enable_progress_bar": False}
    broken, description = perturb(config, rng)
    path = run_dir / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))

    try:
        main(["fit", f"--config={path}"])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, description
    if description.startswith("unknown key"):  # a typo in a key is never silently ignored
        assert code == 2 and "_typo" in err, description
    if code:
        assert code == 2, description
        error_lines = [line for line in err.splitlines() if line.strip()]
        assert any(line.startswith("error:") for line in error_lines), description
        assert len(error_lines) <= 20, f"{description}: {err}"
    elif not description.startswith("missing key"):  # it ran: with the value written, not a silent default
        with pytest.raises(SystemExit):
            main(["fit", f"--config={path}", "--print_config"])
        resolved, written = yaml.safe_load(capsys.readouterr().out), broken
        for key in description.split(" at ")[1].split("."):
            resolved, written = resolved[key], written[key]
        assert resolved == written, description
