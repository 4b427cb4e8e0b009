"""ONNX ``--template`` with the values that live outside the main graph's initializers (issue 21, item 10):
Constant nodes of every form, subgraph initializers (If, Loop), sparse tensors. Whatever ``read``
returned goes back where it was found; oracles: onnx's own decoding (``numpy_helper``) and onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_corpus_onnx import onnx_tensors
from test_onnx import (
    control_flow_model,  # noqa: F401 - the fixture: If, Loop, every Constant form
    function_model,
)

from convert.formats import onnx as onnx_format
from convert.ir import TensorDict

from contract import same_values

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def run(path, cond: bool) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"cond": np.array(cond)})[0]


def dense_of(sparse) -> np.ndarray:
    """A SparseTensorProto made dense from onnx's decoding of its values and indices (linear or per axis)."""
    from onnx import numpy_helper

    values, index = numpy_helper.to_array(sparse.values), numpy_helper.to_array(sparse.indices)
    dense = np.zeros(tuple(sparse.dims), values.dtype)
    if index.ndim == 1:
        dense.reshape(-1)[index] = values
    else:
        dense[tuple(index.T)] = values
    return dense


def test_everything_read_goes_back_into_the_template(control_flow_model, tmp_path):  # noqa: F811
    td = onnx_format.read(control_flow_model)
    out = tmp_path / "back.onnx"
    onnx_format.write(td, out, template=control_flow_model)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    before, after = onnx_tensors(control_flow_model), onnx_tensors(out)
    assert set(after) == set(before)
    for name, value in before.items():
        assert same_values(after[name], value), name
    assert onnx.load(str(out)).graph.sparse_initializer[0] == onnx.load(str(control_flow_model)).graph.sparse_initializer[0]
    for cond in (True, False):
        np.testing.assert_array_equal(run(out, cond), run(control_flow_model, cond))


def test_new_values_land_in_constant_nodes_and_subgraphs(control_flow_model, tmp_path):  # noqa: F811
    td = onnx_format.read(control_flow_model)
    new = {
        "then_c": np.array([10.0, 20.0], np.float32),        # Constant value, in the If's then-branch
        "then_w": np.array([-1.0, -2.0], np.float32),        # initializer of the then-branch
        "body_w": np.array([1.0, 2.0], np.float32),          # initializer of the Loop body
        "else_c": np.array([0.5, 0.25], np.float32),         # value_floats
        "trip": np.array(5, np.int64),                       # main-graph Constant: the Loop's trip count
        "c_float": np.array(-3.5, np.float32),               # value_float
        "c_ints": np.array([7, 8, 9], np.int64),             # value_ints
        "c_strings": np.array([b"x", b"yz"], dtype=object),  # value_strings
        "c_sparse": np.array([[1, 0, 0], [0, 0, 2]], np.float32),  # sparse_value: new non-zeros
        "sp": np.array([[0, 0], [9, 0], [0, 8]], np.int32),  # main-graph sparse initializer
    }
    changed = TensorDict([TensorDict.from_arrays({k: new[k]})[k] if k in new else t for k, t in td.items()])
    out = tmp_path / "new.onnx"
    onnx_format.write(changed, out, template=control_flow_model)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    got = onnx_tensors(out)
    for name, value in new.items():
        if name not in ("c_sparse", "sp", "c_float", "c_strings"):
            assert same_values(got[name], value), name
    model = onnx.load(str(out))
    attribute = {n.output[0]: n.attribute[0] for n in model.graph.node if n.op_type == "Constant"}
    assert attribute["c_float"].name == "value_float" and attribute["c_float"].f == -3.5
    assert list(attribute["c_strings"].strings) == [b"x", b"yz"]
    c_sparse = next(a.sparse_tensor for n in model.graph.node for a in n.attribute if a.name == "sparse_value")
    assert same_values(dense_of(c_sparse), new["c_sparse"])
    assert same_values(dense_of(model.graph.sparse_initializer[0]), new["sp"])
    # still Constant nodes, and no new initializers: the graph is the template's
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in onnx.load(str(control_flow_model)).graph.node]
    assert [i.name for i in model.graph.initializer] == ["main_w"]
    # onnxruntime: the If's then-branch gives then_c + then_w, and the Loop adds body_w trip times
    np.testing.assert_array_equal(run(out, True), new["then_c"] + new["then_w"] + 5 * new["body_w"])
    np.testing.assert_array_equal(run(out, False), new["else_c"])


def test_constant_values_that_do_not_fit_are_listed(control_flow_model, tmp_path):  # noqa: F811
    from convert.errors import WriteError

    td = onnx_format.read(control_flow_model)
    bad = TensorDict([TensorDict.from_arrays({"then_c": np.zeros(3, np.float32)})["then_c"] if k == "then_c" else t
                      for k, t in td.items()])
    with pytest.raises(WriteError, match=r"'then_c' is float32 \[3\], the template's constant is float32 \[2\]"):
        onnx_format.write(bad, tmp_path / "x.onnx", template=control_flow_model)
    assert not (tmp_path / "x.onnx").exists()


def test_a_source_without_the_constants_keeps_the_templates(control_flow_model, tmp_path):  # noqa: F811
    """Weights alone (a state dict has no Constant nodes): the template's constants stay as they are."""
    out = tmp_path / "w.onnx"
    onnx_format.write(TensorDict.from_arrays({"main_w": np.eye(2)}), out, template=control_flow_model)
    before, after = onnx_tensors(control_flow_model), onnx_tensors(out)
    for name in set(before) - {"main_w"}:
        assert same_values(after[name], before[name]), name


def test_constants_of_model_functions_go_back_into_them(tmp_path):
    from onnx import numpy_helper

    model = function_model()
    template = tmp_path / "f.onnx"
    onnx.save(model, str(template))
    out = tmp_path / "g.onnx"
    onnx_format.write(TensorDict.from_arrays({"AddBias/bias": np.array([-4.0], np.float32)}), out, template=template)
    written = onnx.load(str(out))
    assert same_values(numpy_helper.to_array(written.functions[0].node[0].attribute[0].t), np.array([-4.0], np.float32))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": np.array([1.0], np.float32)})[0], [-3.0])
