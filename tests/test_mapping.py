"""Unit tests of the mapping engine (convert/mapping/), the presets, diff and suggest.

Values are checked against NumPy doing the same operation on the input arrays
(np.transpose, np.reshape, np.split, np.concatenate...), never against our own output.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convert import compare as diffmod
from convert import mapping, suggest
from convert.dtypes import by_name
from convert.errors import MappingError
from convert.ir import Source, Tensor, TensorDict

RNG = np.random.default_rng(7)


def rules(text: str, name: str = "r.yaml") -> mapping.RuleSet:
    return mapping.loads(textwrap.dedent(text), name)


def arrays(**shapes) -> dict[str, np.ndarray]:
    return {k.replace("__", "/"): RNG.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


class Recording(Source):
    """A source that logs every read, to prove what mapping does (not) touch."""

    def __init__(self, name: str, array: np.ndarray, log: list[str]):
        self.name, self._array, self.log = name, array, log

    def array(self, dtype, shape):
        self.log.append(self.name)
        return self._array

    def chunks(self, nbytes, size=1 << 20):
        self.log.append(self.name)
        yield self._array.tobytes()


def recording_td(arrs: dict[str, np.ndarray]) -> tuple[TensorDict, list[str]]:
    log: list[str] = []
    td = TensorDict(Tensor(n, by_name(a.dtype.name), a.shape, Recording(n, a, log), {"role": "weight"})
                    for n, a in arrs.items())
    return td, log


# --------------------------------------------------------------------------- transforms vs NumPy

def test_rename_keeps_source_and_reads_nothing():
    arrs = arrays(a__w=(3, 4), b=(2,))
    td, log = recording_td(arrs)
    out, report = mapping.apply(td, [rules(r"""
        schema: 1
        rules:
          - match: '(.+)/w'
            to: '\1.weight'
          - match: 'b'
        """)])
    assert list(out) == ["a.weight", "b"]
    assert out["a.weight"].source is td["a/w"].source
    assert out["b"] is td["b"]
    assert out["a.weight"].attrs == {"role": "weight"}
    assert log == []
    assert report.rows[0].transforms == ()
    np.testing.assert_array_equal(out["a.weight"].numpy(), arrs["a/w"])


def test_transform_is_lazy_and_reads_only_its_tensor():
    arrs = arrays(k=(2, 3, 4), other=(5,), third=(6,))
    td, log = recording_td(arrs)
    out, _ = mapping.apply(td, [rules("""
        schema: 1
        unmatched: keep
        rules:
          - match: k
            transforms: [{transpose: [2, 0, 1]}, {cast: float16}]
        """)])
    assert log == []
    t = out["k"]
    assert t.shape == (4, 2, 3) and t.dtype.name == "float16"  # known before any read
    got = t.numpy()
    assert log == ["k"]
    np.testing.assert_array_equal(got, np.transpose(arrs["k"], (2, 0, 1)).astype(np.float16))
    assert b"".join(bytes(c) for c in t.chunks()) == np.transpose(arrs["k"], (2, 0, 1)).astype("<f2").tobytes()
    assert set(log) == {"k"}


def test_input_not_mutated():
    arrs = arrays(x=(2, 3), y=(3,))
    td = TensorDict.from_arrays(arrs, {"source.format": "test"})
    before = dict(td.items())
    out, _ = mapping.apply(td, [rules("""
        schema: 1
        rules:
          - match: x
            to: z
            transforms: [{transpose: [1, 0]}]
          - match: y
            drop: true
        """)])
    assert dict(td.items()) == before and list(td) == ["x", "y"]
    assert td["x"].shape == (2, 3)
    assert dict(out.metadata) == {"source.format": "test"}
    np.testing.assert_array_equal(td["x"].numpy(), arrs["x"])


@pytest.mark.parametrize("transforms, oracle", [
    ("[{transpose: [1, 2, 0]}]", lambda a: np.transpose(a, (1, 2, 0))),
    ("[{reshape: [6, -1]}]", lambda a: a.reshape(6, -1)),
    ("[{reshape: [0, -1]}]", lambda a: a.reshape(a.shape[0], -1)),
    ("[{reshape: [2, 3, 4]}, {transpose: [2, 0, 1]}, {reshape: [4, 6]}]",
     lambda a: np.transpose(a.reshape(2, 3, 4), (2, 0, 1)).reshape(4, 6)),
    ("[{cast: float64}]", lambda a: a.astype(np.float64)),
    ("[{cast: bfloat16}]", lambda a: a.astype(by_name("bfloat16").numpy)),
    ("[{unsqueeze: 0}]", lambda a: a[None]),
    ("[{unsqueeze: [0, -1]}]", lambda a: np.expand_dims(a, (0, -1))),
    ("[{unsqueeze: 1}, {squeeze: 1}]", lambda a: a),
    ("[{unsqueeze: [0, 4]}, {squeeze: null}]", lambda a: a),
    ("[{transpose: [2, 1, 0]}, {reshape: [-1]}]", lambda a: np.transpose(a, (2, 1, 0)).reshape(-1)),
])
def test_transforms_match_numpy(transforms, oracle):
    a = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    td = TensorDict.from_arrays({"t": a})
    out, report = mapping.apply(td, [rules(f"""
        schema: 1
        rules:
          - match: t
            to: u
            transforms: {transforms}
        """)])
    want = oracle(a)
    t = out["u"]
    assert t.shape == want.shape and t.dtype.numpy == want.dtype
    np.testing.assert_array_equal(t.numpy(), want)
    assert report.rows[0].shape == want.shape


def test_transpose_of_strings():
    a = np.array([[b"a", b"bc"], [b"", b"d"]], dtype=object)
    out, _ = mapping.apply(TensorDict.from_arrays({"s": a}), [rules("""
        schema: 1
        rules: [{match: s, transforms: [{transpose: [1, 0]}]}]
        """)])
    assert out["s"].numpy().tolist() == a.T.tolist()


def test_split_equal_and_sizes():
    a = RNG.standard_normal((6, 4)).astype(np.float32)
    td, log = recording_td({"l0/qkv": a, "gate": RNG.standard_normal((2, 7)).astype(np.float32)})
    out, report = mapping.apply(td, [rules(r"""
        schema: 1
        rules:
          - match: '(\w+)/qkv'
            split: {axis: 0, to: ['\1.q', '\1.k', '\1.v']}
          - match: gate
            transforms: [{transpose: [1, 0]}]
            split: {axis: 0, sizes: [2, -1, 1], to: [g0, g1, g2]}
        """)])
    assert log == []
    assert list(out) == ["l0.q", "l0.k", "l0.v", "g0", "g1", "g2"]
    for got, want in zip(("l0.q", "l0.k", "l0.v"), np.split(a, 3, axis=0), strict=False):
        np.testing.assert_array_equal(out[got].numpy(), want)
    gt = td["gate"].numpy().T
    for got, want in zip(("g0", "g1", "g2"), np.split(gt, [2, 6], axis=0), strict=False):
        assert out[got].shape == want.shape
        np.testing.assert_array_equal(out[got].numpy(), want)
    assert [r.sources for r in report.rows[:3]] == [("l0/qkv",)] * 3


def test_concat_in_given_order_with_transform():
    arrs = {f"enc/{p}/kernel": RNG.standard_normal((4, 3)).astype(np.float32) for p in ("value", "query", "key")}
    arrs["enc/other"] = np.zeros(2, np.float32)
    td, log = recording_td(arrs)
    out, report = mapping.apply(td, [rules(r"""
        schema: 1
        unmatched: keep
        rules:
          - match: '(\w+)/(query|key|value)/kernel'
            to: '\1.in_proj_weight'
            concat: {axis: 1, part: 2, order: [query, key, value]}
            transforms: [{transpose: [1, 0]}]
        """)])
    assert log == []
    assert list(out) == ["enc.in_proj_weight", "enc/other"]
    want = np.concatenate([arrs[f"enc/{p}/kernel"] for p in ("query", "key", "value")], axis=1).T
    assert out["enc.in_proj_weight"].shape == (9, 4)
    np.testing.assert_array_equal(out["enc.in_proj_weight"].numpy(), want)
    assert report.rows[0].sources == ("enc/query/kernel", "enc/key/kernel", "enc/value/kernel")


def test_concat_errors():
    td = TensorDict.from_arrays({"a/x": np.zeros((2, 3)), "a/y": np.zeros((2, 4))})
    rs = rules(r"""
        schema: 1
        rules:
          - match: '(\w)/(x|y|z)'
            to: '\1'
            concat: {axis: 0, part: 2, order: [x, y, z]}
        """)
    with pytest.raises(MappingError, match=r"r.yaml:4: concat into 'a'.*no piece for part\(s\) z"):
        mapping.apply(td, [rs])
    rs = rules(r"""
        schema: 1
        rules: [{match: '(\w)/(x|y)', to: '\1', concat: {axis: 0}}]
        """)
    with pytest.raises(MappingError, match=r"differ outside axis 0"):
        mapping.apply(td, [rs])


# --------------------------------------------------------------------------- matching semantics

def test_first_match_wins_and_conditions():
    td = TensorDict.from_arrays({
        "c/w": np.zeros((5, 5, 1, 8), np.float32), "d/w": np.zeros((3, 2), np.float32),
        "e/w": np.zeros((7,), np.float64), "f/w": np.zeros((1, 9), np.float32), "n": np.int64(1)})
    rs = rules(r"""
        schema: 1
        rules:
          - {match: '(.)/w', rank: 4, to: '\1.conv'}
          - {match: '(.)/w', shape: [null, 9], to: '\1.wide'}
          - {match: '(.)/w', rank: [2, 3], to: '\1.dense'}
          - {match: '(.)/w', dtype: [float64], to: '\1.double'}
          - {match: '.*', to: 'any_\g<0>'}
          - {match: '(.)/w', to: 'never'}
        """)
    out, _ = mapping.apply(td, [rs])
    assert list(out) == ["c.conv", "d.dense", "e.double", "f.wide", "any_n"]


def test_role_and_exists_conditions():
    td = TensorDict([
        Tensor.from_array("a", np.zeros(2), {"role": "optimizer"}), Tensor.from_array("b", np.zeros(2)),
        Tensor.from_array("b/ema", np.ones(2)), Tensor.from_array("c", np.zeros(2))])
    out, report = mapping.apply(td, [rules(r"""
        schema: 1
        unmatched: keep
        rules:
          - {match: '.*', role: optimizer, drop: true}
          - {match: '(.+)/ema', to: '\1'}
          - {match: '(.+)', exists: '\1/ema', drop: true}
        """)])
    assert list(out) == ["b", "c"]
    np.testing.assert_array_equal(out["b"].numpy(), np.ones(2))
    assert [d.sources for d in report.dropped] == [("a",), ("b",)]
    assert report.kept_unmatched == ("c",)


def test_unmatched_error_lists_every_name_at_once():
    td = TensorDict.from_arrays({n: np.zeros(1) for n in ("ok", "x1", "x2", "x3")})
    with pytest.raises(MappingError) as e:
        mapping.apply(td, [rules("schema: 1\nrules: [{match: ok}]\n", "strict.yaml")])
    msg = str(e.value)
    assert "strict.yaml: 3 tensor name(s) match no rule" in msg
    assert all(f"\n  {n}" in msg for n in ("x1", "x2", "x3"))


def test_unmatched_keep_and_drop():
    td = TensorDict.from_arrays({"a": np.zeros(1), "b": np.zeros(1)})
    out, rep = mapping.apply(td, [rules("schema: 1\nunmatched: drop\nrules: [{match: a, to: A}]\n")])
    assert list(out) == ["A"] and rep.dropped[0].sources == ("b",) and "unmatched: drop" in rep.dropped[0].reason
    out, rep = mapping.apply(td, [rules("schema: 1\nunmatched: keep\nrules: [{match: a, to: A}]\n")])
    assert list(out) == ["A", "b"] and rep.kept_unmatched == ("b",)


def test_two_sources_to_one_target_is_an_error_listing_them():
    td = TensorDict.from_arrays({"x/w": np.zeros(1), "y/w": np.zeros(1), "keep": np.zeros(1), "k": np.zeros(1)})
    with pytest.raises(MappingError) as e:
        mapping.apply(td, [rules(r"""
            schema: 1
            unmatched: keep
            rules:
              - {match: '(x|y)/w', to: 'w'}
              - {match: 'k', to: 'keep'}
            """, "c.yaml")])
    msg = str(e.value)
    assert "c.yaml: 2 tensors map to 'w': 'x/w' (rule at c.yaml:5); 'y/w' (rule at c.yaml:5)" in msg
    assert "2 tensors map to 'keep'" in msg and "no rule matched, kept" in msg


def test_transform_that_does_not_fit_names_rule_and_tensor():
    td = TensorDict.from_arrays({"a": np.zeros((2, 3)), "b": np.zeros((4,)), "c": np.zeros((5,))})
    with pytest.raises(MappingError) as e:
        mapping.apply(td, [rules("""
            schema: 1
            rules:
              - match: a
                transforms: [{reshape: [4, -1]}]
              - match: b
                transforms: [{transpose: [1, 0]}]
              - match: c
                transforms: [{squeeze: 0}]
            """, "fit.yaml")])
    msg = str(e.value)
    assert "fit.yaml:4: tensor 'a' float64[2,3]: reshape [4, -1] does not fit shape [2,3]" in msg
    assert "fit.yaml:6: tensor 'b' float64[4]: transpose [1, 0] needs rank 2, tensor has rank 1" in msg
    assert "fit.yaml:8: tensor 'c' float64[5]: squeeze: axis 0 of shape [5] has size 5, not 1" in msg


def test_rule_sets_chain_and_report_composes():
    td = TensorDict.from_arrays({"s/k": RNG.standard_normal((2, 3)), "s/k/Adam": np.zeros((2, 3)), "g": np.int64(3)})
    first = rules("""
        schema: 1
        unmatched: keep
        rules: [{match: 's/k', to: 's.k', transforms: [{transpose: [1, 0]}]}]
        """, "one.yaml")
    second = rules("""
        schema: 1
        rules:
          - {match: '.*/Adam|g', drop: true}
          - {match: 's\\.k', to: 'final', transforms: [{reshape: [-1]}]}
        """, "two.yaml")
    out, rep = mapping.apply(td, [first, second])
    assert list(out) == ["final"]
    np.testing.assert_array_equal(out["final"].numpy(), td["s/k"].numpy().T.reshape(-1))
    row = rep.rows[0]
    assert row.sources == ("s/k",) and row.transforms == ("transpose[1,0]", "reshape[-1]")
    assert row.rules == ("one.yaml:4", "two.yaml:5") and row.before == (("s/k", "float64", (2, 3)),)
    d = rep.to_dict()
    json.dumps(d)
    assert d["tensors_in"] == 3 and d["tensors_out"] == 1 and len(d["dropped"]) == 2
    text = rep.to_text()
    lines = text.splitlines()
    assert lines[0].split() == ["SOURCE", "TARGET", "TRANSFORMS", "BEFORE", "AFTER"]
    assert lines[1].split() == ["s/k", "final", "transpose[1,0]", "reshape[-1]", "float64[2,3]", "float64[6]"]
    assert lines[0].index("TARGET") == lines[1].index("final")  # aligned columns
    assert "dropped (2):" in text and "3 tensors in, 1 out" in text


# --------------------------------------------------------------------------- validation with file:line

BAD = [
    ("rules: []\n", 1, "missing 'schema: 1'"),
    ("schema: 2\nrules: []\n", 1, "unsupported schema 2"),
    ("schema: 1\nunmatched: maybe\nrules: []\n", 2, "unmatched must be one of error, keep, drop"),
    ("schema: 1\n", 1, "missing 'rules'"),
    ("schema: 1\nrulez: []\n", 2, "unknown key 'rulez'"),
    ("schema: 1\nrules: {}\n", 2, "rules must be a list"),
    ("schema: 1\nrules:\n  - to: x\n", 3, "rule 1: missing 'match'"),
    ("schema: 1\nrules:\n  - match: a\n  - match: '(unclosed'\n", 4, "rule 2: match '(unclosed' is not a valid regular expression"),
    ("schema: 1\nrules:\n  - match: '(a)'\n    to: '\\2'\n", 4, "refers to group 2, but 'match' has 1 group(s)"),
    ("schema: 1\nrules:\n  - match: '(?P<x>a)'\n    to: '\\g<y>'\n", 4, "refers to group 'y'"),
    ("schema: 1\nrules:\n  - match: a\n    trasnforms: []\n", 4, "unknown key 'trasnforms'"),
    ("schema: 1\nrules:\n  - match: a\n    transforms:\n      - transpose: [0, 2]\n", 5, "is not a permutation"),
    ("schema: 1\nrules:\n  - match: a\n    transforms:\n      - reshape: [-1, -1]\n", 5, "at most one -1"),
    ("schema: 1\nrules:\n  - match: a\n    transforms:\n      - cast: float33\n", 5, "unknown dtype 'float33'"),
    ("schema: 1\nrules:\n  - match: a\n    transforms:\n      - flip: 0\n", 5, "unknown key 'flip'"),
    ("schema: 1\nrules:\n  - match: a\n    transforms:\n      - {transpose: [0], reshape: [1]}\n", 5, "exactly one of"),
    ("schema: 1\nrules:\n  - match: a\n    transforms:\n      - unsqueeze: []\n", 5, "at least one axis"),
    ("schema: 1\nrules:\n  - match: a\n    drop: true\n    to: b\n", 5, "'to' makes no sense with 'drop: true'"),
    ("schema: 1\nrules:\n  - match: a\n    drop: yes please\n", 4, "drop must be true or false"),
    ("schema: 1\nrules:\n  - match: a\n    rank: two\n", 4, "rank entries must be an integer"),
    ("schema: 1\nrules:\n  - match: a\n    shape: [1, -3]\n", 4, "shape entries must be sizes >= 0 or null"),
    ("schema: 1\nrules:\n  - match: a\n    dtype: [float32, nope]\n", 4, "unknown dtype 'nope'"),
    ("schema: 1\nrules:\n  - match: a\n    split: {to: [x]}\n", 4, "split: to needs at least two targets"),
    ("schema: 1\nrules:\n  - match: a\n    split: {to: [x, y], sizes: [1]}\n", 4, "1 sizes for 2 targets"),
    ("schema: 1\nrules:\n  - match: a\n    to: b\n    split: {to: [x, y]}\n", 4, "give the target names in split"),
    ("schema: 1\nrules:\n  - match: a\n    concat: {axis: 0}\n", 4, "'concat' needs 'to'"),
    ("schema: 1\nrules:\n  - match: '(a)'\n    to: b\n    concat: {part: 3}\n", 5, "part 3: 'match' has 1 group(s)"),
    ("schema: 1\nrules:\n  - match: '(a)'\n    to: b\n    concat: {order: [x]}\n", 5, "'order' needs 'part'"),
    ("schema: 1\nrules:\n  - match: a\n    match: b\n", 4, "key 'match' given twice"),
    ("schema: 1\nrules:\n  - match: 3\n", 3, "match must be a string"),
    ("schema: 1\nrules:\n  - match: a\n    to: [b]\n", 4, "to must be a string"),
    ("schema: 1\nrules:\n  - [a]\n", 3, "rule 1 must be a mapping"),
    ("schema: 1\nrules:\n  - match: [a\n", 4, "invalid YAML"),
    ("", 1, "empty rule file"),
    ("- 1\n", 1, "rule file must be a mapping"),
]


@pytest.mark.parametrize("text, line, message", BAD, ids=[m for _, _, m in BAD])
def test_validation_errors_carry_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MappingError) as e:
        mapping.load(path)
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert message in str(e.value)


def test_rule_objects_are_frozen():
    rs = rules("schema: 1\nrules: [{match: a, transforms: [{transpose: [0]}]}]\n")
    with pytest.raises(AttributeError):
        rs.rules[0].to = "b"
    with pytest.raises(AttributeError):
        rs.rules[0].transforms[0].perm = (1,)
    assert isinstance(rs.rules, tuple)


def test_load_by_path_and_unknown_preset(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("schema: 1\nrules: []\n")
    assert mapping.load(str(p)).path == str(p)
    with pytest.raises(MappingError, match="neither a rule file nor a preset; presets: bert-tf-to-hf"):
        mapping.load("no-such-preset")
    with pytest.raises(MappingError, match="no such rule file"):
        mapping.load(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- presets

PRESETS = ["bert-tf-to-hf", "drop-optimizer", "ema-as-weights", "gguf-to-hf-llama", "hf-llama-to-gguf",
           "keras-to-torch", "tf1-to-torch", "torch-to-tf1"]


def test_presets_listed_with_descriptions_and_documented():
    listed = dict(mapping.presets())
    assert sorted(listed) == PRESETS
    for name in PRESETS:
        assert listed[name] and not listed[name].startswith(name)
        text = mapping.preset_text(name)
        assert text.startswith(f"# {name}: ") and "Example" in text
        rs = mapping.load(name)
        assert rs.rules and rs.description == listed[name]
    for example in ("examples/mnist-cnn-tf1-to-torch", "examples/mnist-cnn-torch-to-tf1"):
        assert mapping.load(example).rules


def test_tf1_to_torch_layouts():
    arrs = {"conv/w": RNG.standard_normal((5, 5, 3, 8)), "fc/weights:0": RNG.standard_normal((6, 4)),
            "c1d/kernel": RNG.standard_normal((3, 2, 5)), "c3d/kernel": RNG.standard_normal((2, 3, 4, 5, 6)),
            "fc/biases:0": RNG.standard_normal(4), "bn/gamma": np.ones(8), "bn/beta": np.zeros(8),
            "bn/moving_mean": np.zeros(8), "bn/moving_variance": np.ones(8), "blk/sub/b": np.zeros(3),
            "conv/w/Adam": np.zeros((5, 5, 3, 8)), "step:0": np.int64(4)}
    out, rep = mapping.apply(TensorDict.from_arrays(arrs), [mapping.load("tf1-to-torch")])
    want = {"conv.weight": np.transpose(arrs["conv/w"], (3, 2, 0, 1)), "fc.weight": arrs["fc/weights:0"].T,
            "c1d.weight": np.transpose(arrs["c1d/kernel"], (2, 1, 0)),
            "c3d.weight": np.transpose(arrs["c3d/kernel"], (4, 3, 0, 1, 2)),
            "fc.bias": arrs["fc/biases:0"], "bn.weight": np.ones(8), "bn.bias": np.zeros(8),
            "bn.running_mean": np.zeros(8), "bn.running_var": np.ones(8), "blk.sub.bias": np.zeros(3),
            "conv/w/Adam": arrs["conv/w/Adam"], "step": 4}
    assert list(out) == list(want)
    for k, v in want.items():
        np.testing.assert_array_equal(out[k].numpy(), v)
    assert rep.kept_unmatched == ("conv/w/Adam",)


def test_torch_to_tf1_inverts_tf1_to_torch():
    arrs = {"conv/kernel": RNG.standard_normal((5, 5, 3, 8)), "conv/bias": RNG.standard_normal(8),
            "fc/kernel": RNG.standard_normal((6, 4)), "fc/bias": RNG.standard_normal(4),
            "c1/kernel": RNG.standard_normal((3, 2, 5)), "c3/kernel": RNG.standard_normal((2, 3, 4, 5, 6)),
            "bn/gamma": RNG.standard_normal(8), "bn/beta": RNG.standard_normal(8),
            "bn/moving_mean": RNG.standard_normal(8), "bn/moving_variance": RNG.standard_normal(8)}
    td = TensorDict.from_arrays(arrs)
    torchish, _ = mapping.apply(td, [mapping.load("tf1-to-torch")])
    extra = Tensor.from_array("bn.num_batches_tracked", np.int64(3))
    torchish = torchish.replace([*torchish.values(), extra])
    back, rep = mapping.apply(torchish, [mapping.load("torch-to-tf1")])
    assert sorted(back) == sorted(arrs)
    for k, v in arrs.items():
        np.testing.assert_array_equal(back[k].numpy(), v)
    assert rep.dropped[0].sources == ("bn.num_batches_tracked",)


def test_drop_optimizer_preset():
    names = ["conv1/w", "conv1/w/Adam", "conv1/w/Adam_1", "beta1_power", "beta2_power", "beta1_power_1",
             "global_step", "fc/b/Momentum", "fc/b/RMSProp", "fc/b/RMSProp_1", "x/adam_m", "x/adam_v",
             "model/optimizer/iter", "optimizer/learning_rate", "l/kernel/.OPTIMIZER_SLOT/optimizer/m", "save_counter",
             "bn/beta", "emb/Adagrad", "w/ExponentialMovingAverage", "adam/iteration", "adam/net_fc_kernel_momentum",
             "sgd_1/m_velocity"]
    td = TensorDict([Tensor.from_array(n, np.zeros(1)) for n in names] + [
        Tensor.from_array("marked", np.zeros(1), {"role": "optimizer"}),
        Tensor.from_array("counter", np.zeros(1), {"role": "step"})])
    out, rep = mapping.apply(td, [mapping.load("drop-optimizer")])
    assert list(out) == ["conv1/w", "bn/beta", "w/ExponentialMovingAverage"]
    assert len(rep.dropped) == len(td) - 3


def test_ema_as_weights_preset():
    arrs = {"a/w": np.zeros(2), "a/w/ExponentialMovingAverage": np.ones(2), "a/b": np.full(2, 5.0)}
    out, _ = mapping.apply(TensorDict.from_arrays(arrs), [mapping.load("ema-as-weights")])
    assert list(out) == ["a/w", "a/b"]
    np.testing.assert_array_equal(out["a/w"].numpy(), np.ones(2))


def _depthwise_tf(x, k):
    """TF's depthwise_conv2d (NHWC, VALID, stride 1) written out from its definition."""
    kh, kw, c, m = k.shape
    n, h, w, _ = x.shape
    out = np.zeros((n, h - kh + 1, w - kw + 1, c * m))
    for i in range(h - kh + 1):
        for j in range(w - kw + 1):
            patch = x[:, i:i + kh, j:j + kw, :]  # n, kh, kw, c
            out[:, i, j, :] = np.einsum("nhwc,hwcm->ncm", patch, k).reshape(n, c * m)
    return out


def _grouped_conv_torchlayout(x_nchw, w):
    """A grouped conv (groups = in channels) with torch's weight layout [C*M, 1, kh, kw], from its definition."""
    n, c, h, wd = x_nchw.shape
    oc, _, kh, kw = w.shape
    m = oc // c
    out = np.zeros((n, oc, h - kh + 1, wd - kw + 1))
    for o in range(oc):
        g = o // m
        for i in range(h - kh + 1):
            for j in range(wd - kw + 1):
                out[:, o, i, j] = np.einsum("nhw,hw->n", x_nchw[:, g, i:i + kh, j:j + kw], w[o, 0])
    return out


def test_keras_to_torch_depthwise_matches_grouped_conv():
    k = RNG.standard_normal((3, 3, 2, 3))
    x = RNG.standard_normal((1, 5, 5, 2))
    td = TensorDict.from_arrays({"m/dw/depthwise_kernel": k, "m/emb/embeddings": np.eye(3),
                                 "m/sep/depthwise_kernel": k, "m/sep/pointwise_kernel": RNG.standard_normal((1, 1, 6, 4)),
                                 "m/dense/kernel": RNG.standard_normal((3, 2)), "m/ln/gamma": np.ones(2)})
    out, _ = mapping.apply(td, [mapping.load("keras-to-torch")])
    assert list(out) == ["m.dw.weight", "m.emb.weight", "m.sep.depthwise.weight", "m.sep.pointwise.weight",
                         "m.dense.weight", "m.ln.weight"]
    w = out["m.dw.weight"].numpy()
    assert w.shape == (6, 1, 3, 3)
    got = _grouped_conv_torchlayout(np.transpose(x, (0, 3, 1, 2)), w)
    np.testing.assert_allclose(np.transpose(got, (0, 2, 3, 1)), _depthwise_tf(x, k), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out["m.sep.pointwise.weight"].numpy(),
                                  np.transpose(td["m/sep/pointwise_kernel"].numpy(), (3, 2, 0, 1)))


# --------------------------------------------------------------------------- diff

def test_diff_reports_every_kind_of_difference():
    a = {"same": np.arange(4.0), "close": np.array([1.0, 2.0, 3.0]), "far": np.array([1.0, -2.0]),
         "shape": np.zeros((2, 2)), "dtype": np.zeros(3, np.float32), "only_a": np.zeros(1),
         "nan": np.array([np.nan, 1.0]), "s": np.array([b"x", b"y"], dtype=object)}
    b = {"same": np.arange(4.0), "close": np.array([1.0, 2.0 + 1e-7, 3.0]), "far": np.array([1.5, -2.0]),
         "shape": np.zeros(4), "dtype": np.zeros(3, np.float64), "only_b": np.zeros(1),
         "nan": np.array([np.nan, 1.0]), "s": np.array([b"x", b"z"], dtype=object)}
    rep = diffmod.diff(TensorDict.from_arrays(a), TensorDict.from_arrays(b), atol=1e-6)
    by = {t.name: t for t in rep.tensors}
    assert not rep.ok
    assert rep.only_in_a == ("only_a",) and rep.only_in_b == ("only_b",)
    assert by["same"].ok and by["same"].status == "equal"
    assert by["close"].ok and by["close"].status == "close"
    assert by["close"].max_abs == pytest.approx(np.max(np.abs(a["close"] - b["close"])))
    assert not by["far"].ok and by["far"].max_abs == 0.5 and by["far"].max_rel == pytest.approx(0.5 / 1.5)
    assert by["far"].mismatched == 1
    assert by["shape"].status == "shape differs" and by["shape"].max_abs is None
    assert by["dtype"].status == "dtype differs" and not by["dtype"].ok
    assert by["nan"].ok
    assert not by["s"].ok and by["s"].mismatched == 1
    json.dumps(rep.to_dict())
    text = rep.to_text()
    assert "only in A (1):" in text and "far" in text and "same" not in text.split("only in A")[0]
    assert text.rstrip().endswith("differ")


def test_diff_agrees_and_tolerances():
    a = RNG.standard_normal(3000)
    b = a * (1 + 1e-9)
    ta, tb = TensorDict.from_arrays({"x": a}), TensorDict.from_arrays({"x": b})
    assert not diffmod.diff(ta, tb).ok
    assert diffmod.diff(ta, tb, rtol=1e-8).ok
    rep = diffmod.diff(ta, tb, atol=1e-6)
    assert rep.ok and rep.to_text().rstrip().endswith("agree")
    assert rep.tensors[0].max_abs == pytest.approx(np.max(np.abs(a - b)))


def test_diff_streams_in_slices(monkeypatch):
    monkeypatch.setattr(diffmod, "_SLICE", 7)
    a = RNG.standard_normal(100)
    b = a.copy()
    b[93] += 2.0
    rep = diffmod.diff(TensorDict.from_arrays({"x": a}), TensorDict.from_arrays({"x": b}))
    assert rep.tensors[0].max_abs == pytest.approx(2.0) and rep.tensors[0].mismatched == 1


# --------------------------------------------------------------------------- suggest

def test_suggest_maps_tf_names_onto_torch_names():
    tf_side = {"conv1/w": RNG.standard_normal((5, 5, 1, 8)), "conv1/b": RNG.standard_normal(8),
               "conv2/w": RNG.standard_normal((5, 5, 8, 16)), "conv2/b": RNG.standard_normal(16),
               "fc1/w": RNG.standard_normal((784, 64)), "fc1/b": RNG.standard_normal(64),
               "fc2/w": RNG.standard_normal((64, 10)), "fc2/b": RNG.standard_normal(10),
               "fc1/w/Adam": np.zeros((784, 64)), "global_step": np.int64(1)}
    torch_side = {"conv1.weight": np.zeros((8, 1, 5, 5)), "conv1.bias": np.zeros(8),
                  "conv2.weight": np.zeros((16, 8, 5, 5)), "conv2.bias": np.zeros(16),
                  "fc1.weight": np.zeros((64, 784)), "fc1.bias": np.zeros(64),
                  "fc2.weight": np.zeros((10, 64)), "fc2.bias": np.zeros(10)}
    a, b = TensorDict.from_arrays(tf_side), TensorDict.from_arrays(torch_side)
    text, ambiguities = suggest.suggest(a, b)
    rs = mapping.loads(text, "suggested.yaml")
    out, _ = mapping.apply(a, [rs])
    assert sorted(out) == sorted(b)
    for name, t in out.items():
        assert t.shape == b[name].shape
    np.testing.assert_array_equal(out["conv2.weight"].numpy(), np.transpose(tf_side["conv2/w"], (3, 2, 0, 1)))
    np.testing.assert_array_equal(out["fc2.weight"].numpy(), tf_side["fc2/w"].T)
    np.testing.assert_array_equal(out["conv1.bias"].numpy(), tf_side["conv1/b"])
    assert ambiguities == []


def test_suggest_flags_ambiguous_matches():
    a = TensorDict.from_arrays({"p": np.zeros((4, 4)), "q": np.zeros((4, 4)), "lonely": np.zeros(7)})
    b = TensorDict.from_arrays({"x": np.zeros((4, 4)), "y": np.zeros((4, 4)), "missing": np.zeros(3)})
    text, ambiguities = suggest.suggest(a, b)
    mapping.loads(text)  # still a valid rule file
    assert any("'x'" in m or "'y'" in m for m in ambiguities)
    assert any("lonely" in m for m in ambiguities) and any("missing" in m for m in ambiguities)
    assert "# AMBIGUOUS" in text


# --------------------------------------------------------------------------- command line

@pytest.fixture
def two_files(tmp_path):
    import convert

    a = {"conv1/w": RNG.standard_normal((5, 5, 1, 8)).astype(np.float32), "conv1/b": np.ones(8, np.float32),
         "conv1/w/Adam": np.zeros((5, 5, 1, 8), np.float32), "global_step": np.int64(3)}
    b = {"conv1.weight": np.transpose(a["conv1/w"], (3, 2, 0, 1)), "conv1.bias": np.ones(8, np.float32)}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    convert.write(TensorDict.from_arrays(a), pa, "safetensors")
    convert.write(TensorDict.from_arrays(b), pb, "safetensors")
    return pa, pb


def cli(argv, capsys):
    from convert.cli import main

    code = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_map_plan_text_and_json(two_files, capsys):
    pa, _ = two_files
    code, out, err = cli(["map", pa, "--map", "tf1-to-torch", "--map", "drop-optimizer", "--plan"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SOURCE", "TARGET", "TRANSFORMS", "BEFORE", "AFTER"]
    assert any(line.split() == ["conv1/w", "conv1.weight", "transpose[3,2,0,1]", "float32[5,5,1,8]", "float32[8,1,5,5]"]
               for line in lines)
    assert "dropped (2):" in out and "conv1/w/Adam" in out
    code, out, _ = cli(["map", pa, "--map", "tf1-to-torch", "--map", "drop-optimizer", "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and d["tensors_in"] == 4 and d["tensors_out"] == 2
    code, out, err = cli(["map", pa, "--map", "bert-tf-to-hf"], capsys)
    assert code == 1 and "match no rule" in err and "conv1/w" in err
    code, _, err = cli(["map", pa, "--map", "nope"], capsys)
    assert code == 1 and "neither a rule file nor a preset" in err


def test_cli_diff_exit_status(two_files, capsys):
    pa, pb = two_files
    code, out, _ = cli(["diff", pa, pb, "--map", "tf1-to-torch", "--map", "drop-optimizer"], capsys)
    assert code == 0 and out.rstrip().endswith("agree")
    code, out, _ = cli(["diff", pa, pb, "--map", "drop-optimizer"], capsys)
    assert code == 1 and "only in A (2):" in out and "only in B (2):" in out
    code, out, _ = cli(["diff", pa, pb, "--map", "tf1-to-torch", "--map", "drop-optimizer", "--json"], capsys)
    assert code == 0 and json.loads(out)["ok"] is True
    code, _, err = cli(["diff", pa, pb, "--atol", "-1"], capsys)
    assert code == 2


def test_cli_map_suggest_writes_a_rule_file_that_works(two_files, tmp_path, capsys):
    pa, pb = two_files
    rules_path = tmp_path / "rules.yaml"
    code, out, err = cli(["map", "suggest", pa, pb, "-o", rules_path], capsys)
    assert code == 0, err
    code, out, err = cli(["diff", pa, pb, "--map", rules_path], capsys)
    assert code == 0, out + err
    code, _, err = cli(["map", "suggest", pa, pb, "-o", rules_path], capsys)
    assert code == 1 and "already exists" in err


def test_cli_mappings_lists_and_shows(capsys):
    code, out, _ = cli(["mappings"], capsys)
    assert code == 0 and all(name in out for name in PRESETS)
    code, out, _ = cli(["mappings", "--json"], capsys)
    assert sorted(r["name"] for r in json.loads(out)) == PRESETS
    code, out, _ = cli(["mappings", "tf1-to-torch"], capsys)
    assert code == 0 and out == mapping.preset_text("tf1-to-torch")
    code, _, err = cli(["mappings", "nope"], capsys)
    assert code == 1 and "no preset named 'nope'" in err


# --------------------------------------------------------------------------- properties


@st.composite
def shape_and_chain(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    steps, oracle_steps, cur = [], [], shape
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            perm = draw(st.permutations(range(len(cur))))
            steps.append(f"{{transpose: {list(perm)}}}")
            oracle_steps.append(lambda a, p=tuple(perm): np.transpose(a, p))
            cur = tuple(cur[i] for i in perm)
        else:
            n = int(np.prod(cur))
            first = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
            dims = [first, -1]
            steps.append(f"{{reshape: {dims}}}")
            oracle_steps.append(lambda a, d=tuple(dims): a.reshape(d))
            cur = (first, n // first)
    return shape, "[" + ", ".join(steps) + "]", oracle_steps


@settings(max_examples=60, deadline=None)
@given(shape_and_chain())
def test_random_transform_chains_match_numpy(case):
    shape, chain, oracle_steps = case
    a = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    out, _ = mapping.apply(TensorDict.from_arrays({"t": a}), [rules(f"schema: 1\nrules: [{{match: t, transforms: {chain}}}]\n")])
    want = a
    for step in oracle_steps:
        want = step(want)
    assert out["t"].shape == want.shape  # known without reading
    np.testing.assert_array_equal(out["t"].numpy(), want)
