"""Every TensorFlow V1/V2 checkpoint in ../shared/corpus (written by other people's TF versions)
is read by us and compared, tensor by tensor and bit for bit, with TensorFlow 2.21:
``tf.train.load_checkpoint(...).get_tensor`` or, for V1 tensors it refuses, ``tf.raw_ops.RestoreV2``.
Each is also migrated to V2 by our writer and read back by TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from convert.formats import tf_checkpoint as tfc

from tf_helpers import assert_same, strip_full_names, tf_value

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not CORPUS.is_dir():
    CORPUS = Path("/work/shared/corpus")

# tensor counts TF lists (corpus README); keyed by the checkpoint prefix relative to the corpus
EXPECTED_COUNTS = {
    "255BITS+vocal-autoencoder@41acb872e8f4/model.ckpt": 6,
    "255BITS+vocal-autoencoder@85d64249fe3c/model.ckpt": 39,
    "AloshkaD+traffic-signs@027fba2f9bc6/model.ckpt": 10,
    "Gknoblau+nxt-tensorflow@cd0f217b6bd9/past_attempts/safe_model.ckpt": 14,
    "Gknoblau+nxt-tensorflow@cd0f217b6bd9/video_weights.ckpt": 14,
    "Aplain+rnnRepo@9262c7d288c5/model.ckpt": 6,
    "amrutha2508+VQ-VAEs@a1239537da56/ckpt-1": 15,
    "psch125+rossman@1e752ce04c9a/variables/variables": 72,
}


def _checkpoints() -> list[tfc.Located]:
    if not CORPUS.is_dir():
        return []
    seen = {}
    for p in sorted(CORPUS.rglob("*")):
        if p.is_file() and tfc.detect(p):
            loc = tfc.locate(p)
            seen.setdefault(loc.prefix, loc)
    return list(seen.values())


CHECKPOINTS = _checkpoints()


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return pytest.importorskip("tensorflow")


def _tf_prefix(loc: tfc.Located) -> str:
    return loc.prefix if loc.version == 2 else loc.files[0]


def test_corpus_has_v1_and_v2():
    versions = {loc.version for loc in CHECKPOINTS}
    assert versions == {1, 2}, "corpus missing"
    assert len(CHECKPOINTS) >= 15
    rel = {str(Path(loc.prefix).relative_to(CORPUS)) for loc in CHECKPOINTS}
    assert set(EXPECTED_COUNTS) <= rel


@pytest.mark.parametrize("loc", CHECKPOINTS, ids=lambda loc: str(Path(loc.prefix).relative_to(CORPUS)))
def test_corpus_checkpoint_matches_tf(tf, loc, tmp_path):
    td = tfc.read(loc.concrete, names="keys")  # TF lists raw keys
    rel = str(Path(loc.prefix).relative_to(CORPUS))
    if rel in EXPECTED_COUNTS:
        assert len(td) == EXPECTED_COUNTS[rel]
    prefix = _tf_prefix(loc)
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    assert sorted(shapes) == sorted(td)
    for name, t in td.items():
        assert t.shape == tuple(shapes[name]), name
        assert t.dtype.tf == dtypes[name].as_datatype_enum, name
        assert_same(t.numpy(), tf_value(tf, prefix, name, t.dtype.numpy), name)
    # migrate to V2 with our writer; TF reads the same values back
    out = tmp_path / "v2"
    tfc.write(td, out)
    new_prefix = tf.train.latest_checkpoint(str(out))
    for name, t in td.items():
        assert_same(tf_value(tf, new_prefix, name, t.dtype.numpy), t.numpy(), name)


def test_corpus_directories_resolve_like_tf(tf):
    """Directories with a 'checkpoint' file: the state files hold the authors' absolute paths,
    which TF cannot follow after the move; we fall back to the basename in the directory."""
    dirs = sorted({p.parent for p in CORPUS.rglob("checkpoint") if p.is_file()})
    assert len(dirs) >= 5
    for d in dirs:
        td = tfc.read(d)
        latest = tf.train.latest_checkpoint(str(d))
        expected = Path(tfc.locate(d).prefix)
        if latest is not None:
            assert Path(latest) == expected
        assert td.metadata["tf.prefix"] == expected.name


def test_corpus_roles_and_metadata():
    vq = tfc.read(CORPUS / "amrutha2508+VQ-VAEs@a1239537da56", names="keys")
    assert vq["_CHECKPOINTABLE_OBJECT_GRAPH"].attrs["role"] == "other"
    assert vq["_CHECKPOINTABLE_OBJECT_GRAPH"].dtype.name == "string"
    meta = tfc.read(CORPUS / "AloshkaD+traffic-signs@027fba2f9bc6").metadata
    assert meta["local.tf.meta_graph_path"].endswith("model.ckpt.meta")
    assert meta["tf.checkpoint_version"] == "1"


def test_pytorch_onnx_and_others_not_claimed():
    for p in CORPUS.rglob("*"):
        if p.is_file() and (p.suffix in (".onnx", ".data", ".pb", ".txt", ".md") or p.name == "checkpoint"
                            or "pytorch" in str(p) or "MNIST" in str(p)):
            if ".data-0" in p.name:
                continue
            assert not tfc.detect(p), p


def test_a_meta_graph_names_the_checkpoint_beside_it(tf):
    """A ``.meta`` file stands for its checkpoint when there is one (TensorFlow reads its prefix)."""
    metas = sorted(CORPUS.rglob("*.meta"))
    assert metas
    for meta in metas:
        prefix = str(meta)[:-len(".meta")]
        shards = sorted(meta.parent.glob(meta.name[:-len(".meta")] + "-?????-of-?????"))
        pattern = prefix + "-?????-of-" + shards[0].name[-5:] if shards else prefix  # a sharded V1 Saver's
        try:
            expected = tf.compat.v1.train.NewCheckpointReader(pattern).get_variable_to_shape_map()
        except Exception:  # noqa: BLE001 - TF's many errors for "no checkpoint here"
            expected = None
        assert tfc.detect(meta) == (expected is not None), meta
        if expected is not None:
            assert set(tfc.read(meta, names="keys")) == set(expected), meta


def test_corpus_object_checkpoint_readable_names(tf):
    """A tf.train.Checkpoint from the corpus: readable names come from the object graph
    (decoded here by TensorFlow's own protobuf class), values from TF's reader by key."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    prefix = str(CORPUS / "amrutha2508+VQ-VAEs@a1239537da56" / "ckpt-1")
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    full_names = {a.checkpoint_key: a.full_name for n in graph.nodes for a in n.attributes if a.full_name}
    td = tfc.read(prefix + ".index")
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in td
    keys = {t.attrs["tf.key"] for t in td.values()}
    assert keys == set(reader.get_variable_to_shape_map()) - {"_CHECKPOINTABLE_OBJECT_GRAPH"}
    for name, t in td.items():
        key = t.attrs["tf.key"]
        if key in full_names:
            assert name == full_names[key]
        assert_same(t.numpy(), tf_value(tf, prefix, key, t.dtype.numpy), name)


@pytest.mark.parametrize("folder", [
    "AloshkaD+traffic-signs@027fba2f9bc6", "255BITS+vocal-autoencoder@85d64249fe3c",
    "tensorflow+serving@27a9c3581077/tensorflow_serving/servables/tensorflow/testdata/half_plus_two/00000123"])
def test_corpus_v1_migration_restores_with_its_graph(tf, folder, tmp_path):
    """The issue's migration on real old checkpoints, whose .meta savers read V1 only
    (RestoreSlice): the graph is rewritten for RestoreV2 (by editing the GraphDef, no TensorFlow;
    tests/test_tf1_roundtrip.py runs it where TensorFlow cannot be imported), and the classic
    loading code restores V2."""
    import convert

    src = CORPUS / folder
    meta = next(src.glob("*.meta"))
    out = tmp_path / "v2"
    summary = convert.convert(src if (src / "checkpoint").exists() else meta.with_suffix(""), out, to="tf-ckpt")
    assert any("rewrote the pre-1.0 .meta graph for V2" in n for n in summary["outputs"][0]["notes"])
    latest = tf.train.latest_checkpoint(str(out))
    assert tfc.read(out).metadata["tf.checkpoint_version"] == "2"
    g = tf.Graph()
    with g.as_default(), tf.compat.v1.Session(graph=g) as sess:
        saver = tf.compat.v1.train.import_meta_graph(latest + ".meta")
        saver.restore(sess, latest)
        original = tf.train.load_checkpoint(str(meta.with_suffix("")))
        for v in tf.compat.v1.global_variables():
            assert_same(sess.run(v), original.get_tensor(v.op.name), v.op.name)


def test_meta_graph_left_out_when_the_tensors_no_longer_fit_it(tmp_path):
    import convert

    examples = Path(__file__).resolve().parents[1] / "examples"
    for kwargs in ({"weights_only": True}, {"dtype": "float16"}):
        out = tmp_path / next(iter(kwargs))
        summary = convert.convert(examples / "model1", out, to="tf-ckpt", **kwargs)
        assert not list(out.glob("*.meta"))
        assert any("left out the .meta graph" in n for n in summary["outputs"][0]["notes"])


SAVED_MODELS = sorted(p.parent for p in CORPUS.rglob("saved_model.pb")) if CORPUS.is_dir() else []


@pytest.mark.parametrize("folder", SAVED_MODELS, ids=lambda p: str(p.relative_to(CORPUS)))
def test_corpus_saved_model_variables_named_as_the_saved_model_names_them(tf, folder, tmp_path):
    """TF2 SavedModels: each variable is named by its node in saved_model.pb's SavedObjectGraph
    (decoded by TF's own classes; shared names fall back to the object path), also once the
    bundle's own full names are gone (as in older SavedModels); values from TF's reader by key."""
    import shutil

    from tensorflow.core.protobuf import saved_model_pb2, trackable_object_graph_pb2

    from convert.formats import saved_model

    prefix = str(folder / "variables" / "variables")
    reader = tf.train.load_checkpoint(prefix)
    td = saved_model.read(folder)
    for name, t in td.items():
        assert_same(t.numpy(), tf_value(tf, prefix, t.attrs.get("tf.key", name), t.dtype.numpy), name)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((folder / "saved_model.pb").read_bytes())
    graphs = [m.object_graph_def for m in proto.meta_graphs if m.HasField("object_graph_def")]
    if not graphs:  # TF1: the keys are the names
        assert sorted(td) == sorted(reader.get_variable_to_shape_map())
        return
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    name_of = {a.checkpoint_key: graphs[0].nodes[i].variable.name for i, n in enumerate(graph.nodes)
               for a in n.attributes}
    shared = {n for n in name_of.values() if list(name_of.values()).count(n) > 1}
    got = {t.attrs["tf.key"]: name for name, t in td.items()}
    assert set(got) == set(name_of)
    for key, name in name_of.items():
        assert got[key] == (name if name not in shared else key.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE")), key
    copy = tmp_path / "sm"
    shutil.copytree(folder, copy)
    strip_full_names(tf, copy)
    assert list(saved_model.read(copy)) == list(td)
