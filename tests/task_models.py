"""Small models of every task kind, built with onnx.helper, and their data files.

regression: x (N, 8) -> three MatMul heads a (N, 2), b (N, 3), c (N, 1);
detection: image (N, 3, H, W) with dynamic H and W -> mask (N, 1, H, W), a sigmoid score
map, and boxes (N, 2, 4) as x1, y1, x2, y2 with x2 > x1 and y2 > y1;
embedding: x (N, 16) -> MatMul, Relu, MatMul -> emb (N, 8).
``noise`` perturbs every weight by that fraction of its spread: a deliberately bad artifact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIDE = 16  # the data's spatial size (the detector's H and W are dynamic)


def _weights(rng: np.random.Generator, noise: float, *shape: int) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[0])
    bad = np.random.default_rng(99).standard_normal(shape).astype(np.float32)
    return (w + noise * float(w.std()) * bad).astype(np.float32)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def regression_model(path: Path, *, noise: float = 0.0) -> Path:
    rng = np.random.default_rng(0)
    heads = {"a": 2, "b": 3, "c": 1}
    inits, nodes = [], []
    for name, width in heads.items():
        inits.append(numpy_helper.from_array(_weights(rng, noise, 8, width), f"w_{name}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w_{name}"], [name]))
    graph = helper.make_graph(
        nodes,
        "regression",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["n", w]) for k, w in heads.items()],
        inits,
    )
    return _save(graph, path)


def detector_model(path: Path, *, noise: float = 0.0) -> Path:
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(_weights(rng, noise, 1, 3, 3, 3) * 3, "k_mask"),
        numpy_helper.from_array(_weights(rng, noise, 8, 3, 3, 3), "k_feat"),
        numpy_helper.from_array(_weights(rng, noise, 8, 4) * 4, "w_pos"),
        numpy_helper.from_array(_weights(rng, noise, 8, 4) * 4, "w_size"),
        numpy_helper.from_array(np.array([-1, 2, 2], np.int64), "boxes_shape"),
        numpy_helper.from_array(np.array([-1, 8], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "k_mask"], ["mask_logits"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["mask_logits"], ["mask"]),
        helper.make_node("Conv", ["image", "k_feat"], ["feat"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["feat"], ["feat_relu"]),
        helper.make_node("GlobalAveragePool", ["feat_relu"], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w_pos"], ["pos_flat"]),
        helper.make_node("MatMul", ["flat", "w_size"], ["size_flat"]),
        helper.make_node("Abs", ["size_flat"], ["size_abs"]),
        helper.make_node("Add", ["size_abs", "one"], ["size_pos"]),
        helper.make_node("Reshape", ["pos_flat", "boxes_shape"], ["xy1"]),
        helper.make_node("Reshape", ["size_pos", "boxes_shape"], ["wh"]),
        helper.make_node("Add", ["xy1", "wh"], ["xy2"]),
        helper.make_node("Concat", ["xy1", "xy2"], ["boxes"], axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["n", 1, "h", "w"]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", 2, 4]),
        ],
        inits,
    )
    return _save(graph, path)


def embedding_model(path: Path, *, noise: float = 0.0) -> Path:
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(_weights(rng, noise, 16, 16), "w1"),
        numpy_helper.from_array(_weights(rng, noise, 16, 8), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["h_relu"]),
        helper.make_node("MatMul", ["h_relu", "w2"], ["emb"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["n", 8])],
        inits,
    )
    return _save(graph, path)


def inputs_for(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = {"regression": (n, 8), "detection": (n, 3, SIDE, SIDE), "embedding": (n, 16)}[kind]
    return rng.standard_normal(shape).astype(np.float32)


def write_data(kind: str, folder: Path) -> tuple[Path, Path]:
    """(eval .npz with float targets 'y', calibration .npz) for ``kind``."""
    x = inputs_for(kind, 64, seed=3)
    eval_npz, calib_npz = folder / f"{kind}-eval.npz", folder / f"{kind}-calib.npz"
    np.savez(eval_npz, x=x, y=np.zeros(len(x), np.float32))
    np.savez(calib_npz, x=inputs_for(kind, 64, seed=4))
    return eval_npz, calib_npz
