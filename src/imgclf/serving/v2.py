"""The Open Inference Protocol V2 (KServe V2, Triton's HTTP/REST API) on `imgclf serve`, so that
`tritonclient.http`, KServe and other V2 clients use the served model as they use any other.

Routes, added to the app by `add_v2_routes`:
- GET /v2 (server metadata); GET /v2/health/live, /v2/health/ready (probes);
- GET /v2/models/{name}[/versions/{version}] (model metadata) and .../ready;
- POST /v2/models/{name}[/versions/{version}]/infer.

The model's name is its registered name (else the ONNX file's stem) and its one version the
version served now. The model may be swapped while serving (serving.follow): each request reads
`live.model` once; asking for another name or version is a 404.

One input per request:
- the model's own tensor (`image`): UINT8 [N, C, H, W], pixels as the model takes them;
- `image_bytes`: BYTES [N], encoded images (PNG, JPEG, ...), base64 strings when sent in JSON.
  They are checked, decoded and classified by POST /v1/predict's own `Classifier`, so its limits,
  decode slots, metrics, drift monitor and capture apply to them alike.
The output, `probabilities`, is FP32 [N, classes], its columns in the order of the metadata's
`parameters.classes`.

Tensors travel in JSON or in the binary tensor data extension, which tritonclient uses by
default: the JSON object first, its length in the `Inference-Header-Content-Length` header, then
the input's bytes (`binary_data_size`). An output goes in binary when the request asks for it
(`binary_data` on the output, else `binary_data_output` on the request).

Errors are the protocol's `{"error": "..."}` with a 4xx: 400 a bad request, tensor or image, 404
an unknown model or version, 413 too large, 415 a compressed body. The request guard
(serving.limits) answers 401 (token) and 413 (declared size) in the same form, before the body is
read; it lets the health probes through without the token, as it does /health.
"""

import base64
import binascii
import importlib.metadata
import json
import math
import struct
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParameter
from fastapi.concurrency import run_in_threadpool
from fastapi.params import Depends
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgclf.serving.follow import LiveModel
from imgclf.serving.model import ServedModel

if TYPE_CHECKING:
    from imgclf.serving.app import Classifier

IMAGE_BYTES = "image_bytes"  # the BYTES input of encoded images
PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX model run by ONNX Runtime
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
ELEMENT_LENGTH = struct.Struct("<I")  # before each element of a binary BYTES tensor: its length
# Parameters of the protocol's other extensions: refused rather than silently ignored.
UNSUPPORTED = {"shared_memory_region": "shared memory", "classification": "the classification extension"}
IMAGE_BYTES_NOTE = (
    "encoded images (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM), one per element, base64 strings in JSON: "
    "decoded and fitted to the model's input as POST /v1/predict does; send it or the pixels, not both"
)


class ProtocolError(Exception):
    """An answer to bad input, as the protocol has it: {"error": message} with a 4xx."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BadRequest(ProtocolError):
    """A 400: the request, a tensor or an image is not what the model takes."""

    def __init__(self, message: str):
        super().__init__(400, message)


# The inference request. Strict: a string is not taken for a number, nor 1.0 for 1, so /openapi.json
# says exactly what is accepted. Parameters are open: the protocol lets clients send others.
class InputParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    binary_data_size: int | None = Field(None, ge=0, description="bytes of this tensor after the JSON object")


class RequestInput(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str = Field(description=f"`image` (UINT8 pixels) or `{IMAGE_BYTES}` (BYTES, encoded images)")
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: InputParameters = Field(default_factory=InputParameters)
    data: list | None = Field(None, description="row-major, flat or nested; absent with binary_data_size")


class OutputParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    binary_data: bool | None = Field(None, description="this output in binary, after the JSON object")


class RequestOutput(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    parameters: OutputParameters = Field(default_factory=OutputParameters)


class RequestParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    binary_data_output: bool | None = Field(None, description="every output in binary, unless it says")


class InferenceRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    id: str | None = None
    parameters: RequestParameters = Field(default_factory=RequestParameters)
    inputs: list[RequestInput] = Field(min_length=1, description="one: `image` or `image_bytes`")
    outputs: list[RequestOutput] | None = None


# The answers, for /openapi.json.
class ErrorBody(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]  # -1: any size (the batch)


class ModelParameters(BaseModel):
    classes: list[str]  # the output's columns
    input: dict  # the model card's input: mode, size, resize, dtype, layout, shape
    image_bytes: str  # what the BYTES input takes


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: ModelParameters


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict | None = None  # binary_data_size when it follows the JSON object
    data: list[float] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


def _inlined(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs written in place: an operation's request body in
    /openapi.json cannot refer to definitions of its own."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


def _error(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


UNAUTHORIZED = {401: _error("a token is set and the request lacks it")}
NOT_SERVED = {404: _error("no such model or version: the served one's name and version are in /v2/models/…")}
INFER_ERRORS = {
    **UNAUTHORIZED,
    **NOT_SERVED,
    400: _error(
        "a bad request: JSON, tensor name, datatype, shape, data, or an image that cannot be decoded"
    ),
    413: _error("request body, or the images' pixels in all, over the limit"),
    415: _error("a compressed body (Content-Encoding): send it uncompressed"),
    200: {
        "model": InferenceResponse,
        "description": f"JSON; with binary outputs, the JSON object ({HEADER_LENGTH} bytes), then theirs",
        "content": {"application/octet-stream": {}},
    },
}
INFER_REQUEST = {
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 1},
            "description": "with binary tensors: the JSON object's length; the tensors' bytes follow it",
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined(InferenceRequest.model_json_schema())},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


def add_v2_routes(
    api: FastAPI, live: LiveModel, classifier: "Classifier", secured: list[Depends], max_images: int
) -> None:
    """The protocol's routes and its error form, on `api`. secured: the dependencies that document
    the token on a route (the request guard enforces it); max_images: encoded images per request."""
    tags = ["Open Inference Protocol (V2)"]
    model_routes = {"tags": tags, "dependencies": secured, "responses": {**UNAUTHORIZED, **NOT_SERVED}}
    served_at_start = live.model  # its name and version: the examples in /openapi.json
    Name = Annotated[
        str, PathParameter(description="the served model's name", examples=[served_at_start.name])
    ]
    Version = Annotated[
        str, PathParameter(description="the served model's version", examples=[served_at_start.version])
    ]

    @api.get("/v2", response_model=ServerMetadata, tags=tags, dependencies=secured, responses=UNAUTHORIZED)
    def server_metadata() -> dict:
        """The server: name, version, the protocol's extensions it supports."""
        return {"name": "imgclf", "version": importlib.metadata.version("imgclf"), "extensions": EXTENSIONS}

    @api.get("/v2/health/live", response_model=Liveness, tags=tags)
    def server_live() -> dict:
        """Liveness; open without the token, as /health, for probers."""
        return {"live": True}

    @api.get("/v2/health/ready", response_model=Readiness, tags=tags)
    def server_ready() -> dict:
        """Readiness: the model is loaded before the server listens. Open without the token."""
        return {"ready": True}

    @api.get("/v2/models/{name}", response_model=ModelMetadata, **model_routes)
    def model_metadata(name: Name) -> dict:
        """The model served now: its inputs, output, version, platform and classes."""
        return metadata(served(live, name))

    @api.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata, **model_routes)
    def version_metadata(name: Name, version: Version) -> dict:
        """The model served now, if it is this version."""
        return metadata(served(live, name, version))

    @api.get("/v2/models/{name}/ready", response_model=ModelReadiness, **model_routes)
    def model_ready(name: Name) -> dict:
        """Whether the model is ready (it is, if it is the one served)."""
        return {"name": served(live, name).name, "ready": True}

    @api.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReadiness, **model_routes)
    def version_ready(name: Name, version: Version) -> dict:
        """Whether this version of the model is ready (it is, if it is the one served)."""
        return {"name": served(live, name, version).name, "ready": True}

    async def infer(request: Request, name: str, version: str | None) -> Response:
        model = served(live, name, version)  # once: a swap during this request does not change its model
        body = await _read_body(request)
        header_length = request.headers.get(HEADER_LENGTH)
        # Parsing, decoding and the model's run happen in the thread pool, off the event loop.
        return await run_in_threadpool(answer, Inference(model, classifier, max_images), body, header_length)

    infer_route = {
        "response_class": Response,
        "tags": tags,
        "dependencies": secured,
        "responses": INFER_ERRORS,
        "openapi_extra": INFER_REQUEST,
    }

    @api.post("/v2/models/{name}/infer", **infer_route)
    async def model_infer(request: Request, name: Name) -> Response:
        """Classify the images of one input, `image` (UINT8 pixels) or `image_bytes` (BYTES,
        encoded images): probabilities (FP32, N × classes), in JSON or binary."""
        return await infer(request, name, None)

    @api.post("/v2/models/{name}/versions/{version}/infer", **infer_route)
    async def version_infer(request: Request, name: Name, version: Version) -> Response:
        """As /v2/models/{name}/infer, if the version served now is this one."""
        return await infer(request, name, version)

    api.add_exception_handler(ProtocolError, _protocol_error)


async def _protocol_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ProtocolError)
    return JSONResponse({"error": error.message}, status_code=error.status)


def served(live: LiveModel, name: str, version: str | None = None) -> ServedModel:
    """The model served now, if it has this name (and version); else a 404 naming what is served."""
    model = live.model
    if name != model.name:
        raise ProtocolError(404, f"unknown model {_shown(name)}: this server serves {model.name!r}")
    if version is not None and version != model.version:
        raise ProtocolError(
            404, f"model {name!r} has no version {_shown(version)} here: version {model.version!r} is served"
        )
    return model


def metadata(model: ServedModel) -> dict:
    channels, height, width = model.card.input.shape
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": [
            {"name": model.input_name, "datatype": "UINT8", "shape": [-1, channels, height, width]},
            {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": [-1, len(model.card.classes)]}],
        "parameters": {
            "classes": list(model.card.classes),
            "input": model.card.input.to_json(),
            "image_bytes": IMAGE_BYTES_NOTE,
        },
    }


async def _read_body(request: Request) -> bytes:
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ProtocolError(
            415, f"Content-Encoding {encoding!r} is not supported: send the body uncompressed"
        )
    try:
        return await request.body()
    except StarletteHTTPException as error:  # the server's body limit, counted as the body is read
        if error.status_code != 413:
            raise
        raise ProtocolError(
            413, "the request body is over the server's limit (imgclf serve --max-body-mb)"
        ) from None


class Inference:
    """One inference request on one model: what it asks, its input, and the answer."""

    def __init__(self, model: ServedModel, classifier: "Classifier", max_images: int):
        self.model, self.classifier, self.max_images = model, classifier, max_images

    def pixels(self, tensor: RequestInput, binary: bytes | None) -> np.ndarray:
        """The UINT8 input as the model's batch (N, C, H, W)."""
        name, image_shape = tensor.name, list(self.model.card.input.shape)
        if tensor.datatype != "UINT8":
            raise BadRequest(
                f"input {name!r}: datatype {_shown(tensor.datatype)}; the model takes UINT8 pixels "
                f"(encoded images go in the BYTES input {IMAGE_BYTES!r})"
            )
        shape = tensor.shape
        if len(shape) != 4 or shape[0] < 1 or shape[1:] != image_shape:
            expected = ", ".join(str(size) for size in ["N", *image_shape])
            raise BadRequest(f"input {name!r}: shape {_shown(shape)}; the model takes [{expected}]")
        count = math.prod(shape)
        if binary is not None:
            if len(binary) != count:
                raise BadRequest(
                    f"input {name!r}: {len(binary)} bytes of binary data; shape {shape} holds {count}"
                )
            return np.frombuffer(binary, dtype=np.uint8).reshape(shape)
        try:
            values = np.array(tensor.data)
        except ValueError:  # ragged, or nested deeper than numpy's dimensions
            values = None
        if values is None or values.dtype.kind not in "iu" or values.size != count:
            raise BadRequest(f"input {name!r}: data must hold {count} integers for shape {shape}")
        if values.min() < 0 or values.max() > 255:
            raise BadRequest(f"input {name!r}: data holds values outside UINT8's 0 to 255")
        return values.astype(np.uint8).reshape(shape)

    def images(self, tensor: RequestInput, binary: bytes | None) -> list[bytes]:
        """The BYTES input's elements: encoded image files."""
        if tensor.datatype != "BYTES":
            raise BadRequest(
                f"input {IMAGE_BYTES!r}: datatype {_shown(tensor.datatype)}; expected BYTES, one encoded "
                f"image (PNG, JPEG, ...) per element (pixels go in the UINT8 input {self.model.input_name!r})"
            )
        shape = tensor.shape
        one_per_row = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)  # [N] or [N, 1]
        if not one_per_row or not 1 <= shape[0] <= self.max_images:
            raise BadRequest(
                f"input {IMAGE_BYTES!r}: shape {_shown(shape)}; expected [N], 1 to {self.max_images} images"
            )
        count = shape[0]
        if binary is not None:
            return _binary_elements(binary, count)
        elements = [item for row in tensor.data for item in (row if isinstance(row, list) else [row])]
        if len(elements) != count or not all(isinstance(item, str) for item in elements):
            raise BadRequest(
                f"input {IMAGE_BYTES!r}: data must hold {count} strings, each an image in base64"
            )
        images = []
        for index, item in enumerate(elements):
            try:
                images.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise BadRequest(
                    f"input {IMAGE_BYTES!r}: element {index} is not base64 (in JSON, images are base64)"
                ) from None
        return images

    def classify(self, request: InferenceRequest, binary: bytes) -> np.ndarray:
        """The probabilities (N, classes) for the request's one input."""
        model = self.model
        if len(request.inputs) != 1:
            names = ", ".join(_shown(tensor.name) for tensor in request.inputs[:5])
            raise BadRequest(
                f"{len(request.inputs)} inputs ({names}): send one, {model.input_name!r} or {IMAGE_BYTES!r}"
            )
        tensor = request.inputs[0]
        if tensor.name not in (model.input_name, IMAGE_BYTES):
            taken = f"{model.input_name!r} or {IMAGE_BYTES!r}"
            raise BadRequest(f"unknown input {_shown(tensor.name)}: the model takes {taken}")
        _refuse_extensions(f"input {tensor.name!r}", tensor.parameters.model_extra)
        data = _tensor_bytes(tensor, binary)
        if tensor.name == model.input_name:
            return self.classifier.classify_pixels(model, self.pixels(tensor, data))
        files = [(f"{IMAGE_BYTES}[{i}]", image) for i, image in enumerate(self.images(tensor, data))]
        try:
            return self.classifier.classify_files(model, files)
        except HTTPException as error:  # a 400 or 413, in /v1/predict's words
            raise ProtocolError(error.status_code, str(error.detail)) from None

    def binary_output(self, request: InferenceRequest) -> bool:
        """Whether the output goes in binary; 400 for an output the model does not have."""
        default = bool(request.parameters.binary_data_output)
        for output in request.outputs or []:
            if output.name != self.model.output_name:
                raise BadRequest(
                    f"unknown output {_shown(output.name)}: the model has one, {self.model.output_name!r}"
                )
            _refuse_extensions(f"output {output.name!r}", output.parameters.model_extra)
        if not request.outputs:
            return default
        chosen = request.outputs[0].parameters.binary_data
        return default if chosen is None else chosen


def answer(inference: Inference, body: bytes, header_length: str | None) -> Response:
    """The response to one inference request's body; ProtocolError for bad input."""
    header, binary = _split_body(body, header_length)
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as error:
        raise BadRequest(f"bad inference request: {_first_error(error)}") from None
    binary_output = inference.binary_output(request)  # before any work: an unknown output is refused
    probabilities = inference.classify(request, binary)
    return encode_response(inference.model, request.id, probabilities, binary_output)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON object, the binary tensor data after it)."""
    if header_length is None:
        return body, b""
    size = header_length.strip()
    if not (size.isascii() and size.isdigit() and 0 < int(size) <= len(body)):
        raise BadRequest(
            f"{HEADER_LENGTH} {header_length!r}: expected the JSON object's length, 1 to {len(body)} bytes"
        )
    return body[: int(size)], body[int(size) :]


def _tensor_bytes(tensor: RequestInput, binary: bytes) -> bytes | None:
    """The input's binary data, None if it is in JSON (`data`); 400 if the two do not add up."""
    size = tensor.parameters.binary_data_size
    if size is None:
        if binary:
            raise BadRequest(
                f"{len(binary)} bytes after the JSON object, but input {tensor.name!r} lacks binary_data_size"
            )
        if tensor.data is None:
            raise BadRequest(
                f"input {tensor.name!r} has no data: give `data`, or binary_data_size and the bytes"
            )
        return None
    if tensor.data is not None:
        raise BadRequest(f"input {tensor.name!r} has both data and binary_data_size: give one")
    if size != len(binary):
        raise BadRequest(
            f"input {tensor.name!r}: binary_data_size {size}, but {len(binary)} bytes follow the JSON "
            f"object (its length is the {HEADER_LENGTH} header)"
        )
    return binary


def _binary_elements(buffer: bytes, count: int) -> list[bytes]:
    """A binary BYTES tensor's `count` elements, each a 4-byte little-endian length and the bytes."""
    elements, offset = [], 0
    while offset < len(buffer) and len(elements) < count:
        if offset + ELEMENT_LENGTH.size > len(buffer):
            break
        (length,) = ELEMENT_LENGTH.unpack_from(buffer, offset)
        offset += ELEMENT_LENGTH.size
        if offset + length > len(buffer):
            remain = len(buffer) - offset
            raise BadRequest(
                f"input {IMAGE_BYTES!r}: element {len(elements)} says {length} bytes, {remain} remain"
            )
        elements.append(buffer[offset : offset + length])
        offset += length
    if len(elements) != count or offset != len(buffer):
        raise BadRequest(
            f"input {IMAGE_BYTES!r}: the binary data is not {count} elements, each a 4-byte little-endian "
            "length and that many bytes"
        )
    return elements


def _refuse_extensions(what: str, parameters: dict[str, Any] | None) -> None:
    for key, extension in UNSUPPORTED.items():
        if key in (parameters or {}):
            raise BadRequest(f"{what}: parameter {key!r}: {extension} is not supported")


def _shown(value: Any, limit: int = 80) -> str:
    """A value from the request, as an error quotes it: repr, cut short (a name may be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _first_error(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def encode_response(
    model: ServedModel, request_id: str | None, probabilities: np.ndarray, binary: bool
) -> Response:
    """The inference response: JSON, or the JSON object and the output's bytes (little-endian FP32)."""
    output: dict[str, Any] = {
        "name": model.output_name,
        "datatype": "FP32",
        "shape": list(probabilities.shape),
    }
    body: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = [output]
    if not binary:
        output["data"] = probabilities.ravel().tolist()  # Python floats: each float32 exactly
        return Response(json.dumps(body).encode(), media_type="application/json")
    data = np.ascontiguousarray(probabilities, dtype="<f4").tobytes()
    output["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps(body).encode()
    return Response(
        header + data, media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(header))}
    )
