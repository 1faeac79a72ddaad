"""Delivery by content vs the whole bundle: bytes on the wire and push -> active, over MQTT and HTTP.

    .venv/bin/python bench/delivery.py          (also run by bench/transfer.py --delivery)

A real agent process per path (generic-x86_64: it runs the int8 ONNX artifact), a real
Mosquitto, the registry, and nginx on loopback. Bundles: an MLP 64-1200-1000-10 as fp32 ONNX,
int8 ONNX (ORT dynamic quantization) and fp32 + int8 TFLite (Keras, when TensorFlow imports).
Versions: N; N+1 re-quantizes the int8 ONNX only (one file changes); N+2 prunes 90 % of the
weights (every model changes). Then HTTP download throughput vs curl from the same nginx.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.transfer import _big_onnx, start_broker
from edgeagent.bundle.create import create_bundle
from edgeagent.delivery.http import download
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import BundleRef, HttpSource, Topics
from edgeagent.signing import SigningKey, generate_keypair
from edgeagent.transfer import Wanted
from fleet.publish import FolderDestination, publish
from fleet.push import FleetConnection, Target, publish_desired, wait_for
from fleet.registry import Registry

MiB = 1 << 20


def models(workdir: Path, version: int) -> list[Path]:
    """fp32 + int8 ONNX (+ fp32/int8 TFLite when TensorFlow imports) of one version."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = workdir / f"v{version}"
    folder.mkdir()
    fp32 = folder / "mlp.onnx"
    _big_onnx(fp32, 0)
    if version == 2:  # 90 % pruned: the smallest weights become zeros
        model = onnx.load(str(fp32))
        for init in model.graph.initializer:
            w = numpy_helper.to_array(init).copy()
            w[np.abs(w) < np.quantile(np.abs(w), 0.9)] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
        onnx.save(model, str(fp32))
    int8 = folder / "mlp_int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=version == 1)
    return [fp32, int8, *tflite(fp32, folder)]


def tflite(fp32: Path, folder: Path) -> list[Path]:
    try:
        import numpy as np
        import onnx
        import tensorflow as tf
        from onnx import numpy_helper
    except ImportError:
        return []
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(fp32)).graph.initializer]
    layers = [tf.keras.layers.Input((64,))]
    keras = tf.keras.Sequential(
        [
            *layers,
            *(
                tf.keras.layers.Dense(w.shape[1], use_bias=False, activation="relu" if i < 2 else None)
                for i, w in enumerate(weights)
            ),
        ]
    )
    keras.set_weights(weights)
    out = []
    for name, quant in (("mlp.tflite", False), ("mlp_int8.tflite", True)):
        conv = tf.lite.TFLiteConverter.from_keras_model(keras)
        if quant:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: (
                [np.random.rand(1, 64).astype(np.float32)] for _ in range(20)
            )
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        (folder / name).write_bytes(conv.convert())
        out.append(folder / name)
    return out


class Route:
    """One delivery path: an agent process and how its desired docs name the bundle."""

    def __init__(self, name: str, workdir: Path, port: int, keys: Path, mode: str, http: str) -> None:
        self.name, self.mode, self.http = name, mode, http
        root = workdir / name
        root.mkdir()
        config = root / "agent.toml"
        config.write_text(
            f'device_id = "{name}"\nstate_dir = "{root / "state"}"\nsocket_path = "{root / "a.sock"}"\n'
            f'broker_url = "mqtt://127.0.0.1:{port}"\ntopic_prefix = "bench"\ntrusted_keys = "{keys}"\n'
            'profile = "generic-x86_64"\ntelemetry_interval_s = 0\n'
        )
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "edgeagent"), "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def ref(self, ref: BundleRef, index) -> BundleRef:  # type: ignore[no-untyped-def]
        if self.mode == "whole":
            return ref
        sources = [HttpSource(url=self.http)] if self.mode == "http" else []
        return ref.model_copy(update={"index": index, "sources": sources})

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def nginx_bytes(log: Path, since: int) -> tuple[int, int]:
    """(body bytes sent, line count) of nginx's access log after line ``since``."""
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(int(line.split('"')[2].split()[1]) for line in lines[since:]), len(lines)


def main() -> int:
    from tests.http_support import Nginx

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        generate_keypair("bench", workdir / "keys")
        key = SigningKey.load(workdir / "keys" / "bench.key")
        registry_dir, www = workdir / "registry", workdir / "www"
        registry_dir.mkdir()
        www.mkdir()
        (workdir / "nginx").mkdir()
        nginx = Nginx(workdir / "nginx", www).start()
        broker, port = start_broker(workdir)
        registry = Registry(BrokerConfig("127.0.0.1", port), registry_dir, topics=Topics("bench")).start()
        paths = [
            Route(n, workdir, port, workdir / "keys", n.split("-")[0], nginx.url)
            for n in ("whole-mqtt", "mqtt-content", "http-content")
        ]
        print(f"{'version':10} {'path':14} {'bundle':>9} {'on wire':>9} {'time s':>7}")
        try:
            with FleetConnection(BrokerConfig("127.0.0.1", port), Topics("bench"), "bench-push") as conn:
                for version, what in ((0, "N"), (1, "N+1 int8"), (2, "N+2 pruned")):
                    files = models(workdir, version)
                    created = create_bundle(
                        name="big", version=f"1.0.{version}", models=files, key=key, out_dir=registry_dir
                    )
                    done = publish(created.path, FolderDestination(registry_dir))
                    publish(created.path, FolderDestination(www))
                    ref = BundleRef(
                        name="big",
                        version=f"1.0.{version}",
                        sha256=created.sha256,
                        size=created.path.stat().st_size,
                    )
                    for p in paths:
                        before = registry.stats.bytes_served
                        _, lines = nginx_bytes(nginx.access_log, 0)
                        start = time.perf_counter()
                        publish_desired(
                            conn, Target("device", p.name), "default", p.ref(ref, done.index), key
                        )
                        result = wait_for(conn, [p.name], "default", ref, 300, lambda line: None)[0]
                        secs = time.perf_counter() - start
                        if not result.ok:
                            raise RuntimeError(f"{p.name}: {result.detail}")
                        wire = registry.stats.bytes_served - before + nginx_bytes(nginx.access_log, lines)[0]
                        print(f"{what:10} {p.name:14} {ref.size:9} {wire:9} {secs:7.2f}")
        finally:
            for p in paths:
                p.close()
            registry.close()
            broker.terminate()
        http_vs_curl(nginx, www)
        nginx.stop()
    return 0


def http_vs_curl(nginx, www: Path, size: int = 256 * MiB) -> None:  # type: ignore[no-untyped-def]
    data = bytes(size)  # zeros: nginx serves from the page cache either way
    (www / "big").write_bytes(data)
    want = Wanted(
        hashlib.sha256(data).hexdigest(),
        size,
        64 * 1024,
        tuple(hashlib.sha256(data[i : i + 65536]).hexdigest() for i in range(0, size, 65536)),
        ".obj",
    )
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs, hashed = [], [], []
        for _ in range(3):
            part = Path(tmp) / f"{want.sha256}.hpart"
            start = time.perf_counter()
            download(nginx.url + "big", want, part).unlink()
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run(
                [shutil.which("curl") or "curl", "-s", "-o", str(Path(tmp) / "c"), nginx.url + "big"],
                check=True,
            )
            theirs.append(time.perf_counter() - start)
            start = time.perf_counter()  # what checking curl's file costs (we hash as we go)
            hashlib.sha256((Path(tmp) / "c").read_bytes()).hexdigest()
            hashed.append(theirs[-1] + time.perf_counter() - start)
    best_ours, best_curl, best_hashed = min(ours), min(theirs), min(hashed)
    print(
        f"\nHTTP {size // MiB} MiB from nginx: ours {size / best_ours / 1e6:.0f} MB/s (every 64 KiB block "
        f"checked against its sha256), curl {size / best_curl / 1e6:.0f} MB/s ({best_curl / best_ours:.2f}x), "
        f"curl then sha256 {size / best_hashed / 1e6:.0f} MB/s ({best_hashed / best_ours:.2f}x)"
    )


if __name__ == "__main__":
    sys.exit(main())
