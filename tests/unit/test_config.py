from pathlib import Path

import pytest

from epp.config import DEFAULT_CONFIG, Built, build, config_watcher, load_config, parse_config
from epp.scheduling.types import ConfigError

REFERENCE_STYLE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: []
plugins:
- type: single-profile-handler
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 16, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
"""


def test_default_and_reference_style_configs_parse() -> None:
    for text in (DEFAULT_CONFIG, REFERENCE_STYLE):
        cfg = parse_config(text, "c.yaml")
        assert cfg.scorer_refs == (("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0),
                                   ("prefix-cache-scorer", 3.0))
        scheduler, _ = cfg.build()
        assert scheduler.profile.picker.type_name == "max-score-picker"


@pytest.mark.parametrize(("snippet", "path", "message"), [
    ("plugins:\n- type: nope\nschedulingProfiles: [{name: d, plugins: []}]", "plugins[0].type", "unknown plugin"),
    ("plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 0}\n"
     "schedulingProfiles: [{name: d, plugins: []}]", "plugins[0].parameters.blockSizeTokens", ">= 1"),
    ("plugins:\n- type: queue-scorer\n  parameters: {foo: 1}\nschedulingProfiles: [{name: d, plugins: []}]",
     "plugins[0].parameters.foo", "unknown parameter"),
    ("plugins: []\nschedulingProfiles: [{name: d, plugins: [{pluginRef: ghost}]}]",
     "schedulingProfiles[0].plugins[0].pluginRef", "no plugin named"),
    ("plugins:\n- type: queue-scorer\nschedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer, "
     "weight: -1}]}]", "schedulingProfiles[0].plugins[0].weight", ">= 0"),
    ("bogus: 1\nschedulingProfiles: [{name: d}]", "bogus", "unknown field"),
    ("kind: Other\nschedulingProfiles: [{name: d}]", "kind", "EndpointPickerConfig"),
    ("plugins: [\n", "line", "invalid YAML"),
])
def test_errors_name_file_and_field(snippet: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(snippet, "my.yaml")
    assert str(e.value).startswith(f"my.yaml: {path}")
    assert message in str(e.value)


def test_load_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/epp.yaml")


def test_watcher_applies_valid_changes_and_keeps_old_on_invalid(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(DEFAULT_CONFIG)
    applied: list[Built] = []
    w = config_watcher(str(f), build(load_config(str(f))), applied.append)
    assert w.check() is False
    f.write_text(DEFAULT_CONFIG.replace("weight: 3", "weight: 5"))
    assert w.check() is True
    assert applied[-1].config.scorer_refs[-1] == ("prefix-cache-scorer", 5.0)
    f.write_text("plugins: [broken")
    assert w.check() is False and w.last_error is not None and "invalid YAML" in w.last_error
    assert w.current is not None and w.current.config.scorer_refs[-1] == ("prefix-cache-scorer", 5.0)


def test_rebuild_keeps_prefix_index_when_its_parameters_are_unchanged() -> None:
    cfg = parse_config(DEFAULT_CONFIG)
    s1, plugins = cfg.build()
    s2, _ = parse_config(DEFAULT_CONFIG.replace("weight: 3", "weight: 4")).build(plugins)
    prefix1 = next(s for s, _ in s1.profile.scorers if s.type_name == "prefix-cache-scorer")
    prefix2 = next(s for s, _ in s2.profile.scorers if s.type_name == "prefix-cache-scorer")
    assert prefix1 is prefix2
