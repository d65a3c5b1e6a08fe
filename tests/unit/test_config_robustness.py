"""Config files are operator input: every bad file gets one line naming the file and field, a
reload keeps the old state, and a later valid edit still applies."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from epp.config import DEFAULT_CONFIG, build, config_watcher, load_config, parse_config
from epp.scheduling.types import ConfigError

PROFILE = """\
plugins:
- type: queue-scorer
- type: prefix-cache-scorer
  parameters: {params}
schedulingProfiles:
- plugins:
  - pluginRef: queue-scorer
    weight: {weight}
  - pluginRef: prefix-cache-scorer
"""


@pytest.mark.parametrize("weight,params,path", [
    (".nan", "{}", "schedulingProfiles[0].plugins[0].weight"),
    (".inf", "{}", "schedulingProfiles[0].plugins[0].weight"),
    ("1e400", "{}", "schedulingProfiles[0].plugins[0].weight"),
    ("10000000", "{}", "schedulingProfiles[0].plugins[0].weight"),
    ("1", "{blockSizeTokens: 100000000000000000000}", "plugins[1].parameters.blockSizeTokens"),
    ("1", "{lruCapacityPerServer: 100000000000000}", "plugins[1].parameters.lruCapacityPerServer"),
    ("1", "{balanceAbsThreshold: .nan}", "plugins[1].parameters.balanceAbsThreshold"),
    ("1", "{balanceRelThreshold: .inf}", "plugins[1].parameters.balanceRelThreshold"),
])
def test_non_finite_and_absurd_numbers_are_refused(weight: str, params: str, path: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(PROFILE.format(weight=weight, params=params), "f.yaml")
    assert str(e.value).startswith(f"f.yaml: {path}:")


BAD_DOCUMENTS = {
    "unhashable pluginRef": PROFILE.format(weight=1, params="{}").replace("pluginRef: queue-scorer",
                                                                          "pluginRef: [x]"),
    "deep nesting": "a: " + "[" * 50_000,
    "list profile name": "schedulingProfiles: [{name: [1]}]",
    "map feature gate": "featureGates: [{a: 1}]",
    "huge type": "plugins: [{type: " + "x" * 100_000 + "}]",
    "binary": "\x00\x01\x02",
}


@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
def test_bad_documents_get_one_line_naming_the_file(case: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(BAD_DOCUMENTS[case], "f.yaml")
    message = str(e.value)
    assert message.startswith("f.yaml: ") and "\n" not in message and len(message) < 1000


def test_non_utf8_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(DEFAULT_CONFIG.encode() + b"# \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c.yaml: document: not UTF-8 text \(byte \d+"):
        load_config(str(f))


def test_validate_prints_no_traceback(tmp_path: Path) -> None:
    outputs = []
    for i, text in enumerate(BAD_DOCUMENTS.values()):
        f = tmp_path / f"{i}.yaml"
        f.write_text(text)
        r = subprocess.run([sys.executable, "-m", "epp.cli", "config", "validate", str(f)], capture_output=True,
                           text=True, timeout=60)
        outputs.append((r.returncode, r.stderr))
    for rc, err in outputs:
        assert rc == 1 and "Traceback" not in err and err.startswith("invalid: ") and err.count("\n") == 1


def test_reload_survives_any_bad_edit_and_applies_the_next_valid_one(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(DEFAULT_CONFIG)
    applied = []
    watcher = config_watcher(str(f), build(load_config(str(f))), applied.append)
    caplog.set_level(logging.ERROR)
    bad_edits = [PROFILE.format(weight=1, params="{}").replace("pluginRef: queue-scorer", "pluginRef: [x]"),
                 "a: " + "[" * 50_000, None, PROFILE.format(weight=".nan", params="{}")]
    for text in bad_edits:
        if text is None:
            f.write_bytes(b"\xff\xfe\x00")
        else:
            f.write_text(text)
        assert watcher.check() is False
        assert watcher.check() is False  # the same bad version is not parsed (nor logged) again
    assert applied == [] and watcher.rejected == len(bad_edits)
    assert len([r for r in caplog.records if "ignored" in r.getMessage()]) == len(bad_edits)
    f.write_text(PROFILE.format(weight=5, params="{}"))
    assert watcher.check() is True
    assert [dict(c.config.scorer_refs)["queue-scorer"] for c in applied] == [5.0]
