"""The README's table of ``policy_kwargs`` defaults matches the code (ElmurConfig and ElmurPolicy)."""

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from sb3_elmur.common.config import ElmurConfig
from sb3_elmur.common.policies import ElmurPolicy

README = Path(__file__).resolve().parents[1] / "README.md"


def _parse_value(text: str) -> Any:
    text = text.strip().strip("`").strip()
    text = re.sub(r"(\d+)\s*\^\s*(\d+)", lambda m: str(int(m.group(1)) ** int(m.group(2))), text)
    return ast.literal_eval(text)


def _readme_defaults() -> List[Tuple[str, Any]]:
    """(key, documented default) for every key of the table under "## Use"."""
    section = README.read_text(encoding="utf-8").split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no policy_kwargs table found under '## Use' in README.md"
    pairs = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        keys = [key.strip().strip("`") for key in cells[0].split(",")]
        values = [_parse_value(value) for value in cells[1].split(",")]
        if len(values) == 1:  # one value stated for several keys
            values *= len(keys)
        assert len(values) == len(keys), f"README row {row!r}: {len(keys)} keys but {len(values)} defaults"
        pairs.extend(zip(keys, values))
    return pairs


def _code_defaults() -> Dict[str, Any]:
    defaults: Dict[str, Any] = {
        name: parameter.default
        for name, parameter in inspect.signature(ElmurPolicy.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    defaults.update(dataclasses.asdict(ElmurConfig()))  # max_distance resolved by the default distance_bias
    return defaults


@pytest.mark.parametrize("key, documented", _readme_defaults(), ids=lambda value: str(value))
def test_readme_default_matches_code(key, documented):
    code = _code_defaults()
    assert key in code, f"README documents {key!r}, which is neither an ElmurConfig field nor an ElmurPolicy argument"
    assert type(documented) is type(code[key]) and documented == code[key], (
        f"README says {key} defaults to {documented!r}, the code uses {code[key]!r}"
    )


def test_readme_documents_every_config_field():
    documented = {key for key, _ in _readme_defaults()}
    missing = [field.name for field in dataclasses.fields(ElmurConfig) if field.name not in documented]
    assert not missing, f"ElmurConfig fields missing from README's policy_kwargs table: {missing}"
