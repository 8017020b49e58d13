"""ONNX Runtime sessions, one way for the whole project: export's parity gate, evaluate, serving.

Its own module so that the stages which run a model depend on how a session is made, and not on
each other's code (editing the latency measurement must not re-run export).
"""

import os

import numpy as np


def inference_session(model: str | os.PathLike | bytes, threads: int = 0, spin: bool = True):
    """A CPU session on a model file or serialized bytes (threads 0: ONNX Runtime's default).

    spin=False stops idle intra-op threads from spinning: a server needs that CPU for its event
    loop; a benchmark wants the spinning, which shaves latency off back-to-back runs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def predict_probabilities(session, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """The session's output for uint8 images (N, C, H, W), run `batch` images at a time."""
    input_name = session.get_inputs()[0].name
    chunks = [
        session.run(None, {input_name: np.ascontiguousarray(images[start : start + batch])})[0]
        for start in range(0, len(images), batch)
    ]
    return np.concatenate(chunks)
