"""A user's code, type-checked in CI and never run: what a checker must accept, and
what it must reject (each rejection carries an ignore that fails when unused)."""
# pyright: reportUnnecessaryTypeIgnoreComment=true

from typing import Any, assert_type

import decaymask as dm

policy = dm.Policy(dm.decay(layer="linear", param="weight"), dm.no_decay(path="*/bias"))
assert_type(policy.rules, tuple[dm.Rule, ...])
assert_type(policy.default, bool)
assert_type(policy.strict, bool)
assert_type(policy.rules[0].decay, bool | None)
assert_type(policy.rules[0].rate, float)
assert_type(policy.rules[0].group, str)
assert_type(dm.presets.standard(), dm.Policy)
assert_type(dm.presets.muon(), dm.Policy)
assert_type(dm.label("head", layer="linear"), dm.Rule)

report = policy.explain({})
assert_type(report, dm.Report)
assert_type(report[0], dm.Decision)
assert_type(report[:3], dm.Report)
assert_type(report[0].decay, bool)
assert_type(report[0].leaf, dm.Leaf)
assert_type(report[0].leaf.path, str)

# Masks, labels, rates and Muon dims have the structure of the input tree, with a
# value of their own at its leaves: no type says that, so they are Any.
assert_type(policy.for_equinox({}), Any)

# A misspelt selector, a selector of the wrong type, a positional selector.
dm.decay(layr="linear")  # type: ignore[call-arg]
dm.no_decay(min_ndim="2")  # type: ignore[arg-type]
dm.decay("linear")  # type: ignore[call-arg]
