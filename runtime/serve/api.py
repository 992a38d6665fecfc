"""The HTTP API's shapes: the OpenAI Images API request (with fastdiff's own fields beside OpenAI's), and its errors
in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so that the official `openai` client and the
tools built on it read them as they read OpenAI's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # the API's name -> PIL's
MAX_PROMPT_CHARS = 32000  # OpenAI's own bound for gpt-image-1; the tokenizer truncates far earlier
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes


class ApiError(Exception):
    """A request the server refuses or cannot answer: an HTTP status and an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageRequest(BaseModel):
    """POST /v1/images/generations. OpenAI's fields (its other image fields are accepted and have no effect here),
    then fastdiff's. Integers are strict: `"n": "2"` or `"n": true` is refused, not converted."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = None  # a LoRA's id (GET /v1/models) selects it; any other: accepted, no effect
    n: int | None = Field(None, strict=True)  # None (as the openai client sends n=None): 1
    size: str | None = None  # "WxH", one of the artifact's; None or "auto": the model's default
    response_format: Literal["b64_json", "url"] | None = None  # "url" is refused: the server keeps no images
    output_format: Literal["png", "jpeg", "webp"] | None = None  # None: png
    output_compression: int | None = Field(None, ge=0, le=100, strict=True)  # jpeg and webp quality
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(None, strict=True)
    guidance_scale: float | None = Field(None, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    lora: str | None = None  # a loaded LoRA's name (fastdiff-serve --lora NAME=FILE); None: the base
    lora_scale: float | None = Field(None, allow_inf_nan=False)  # the LoRA's weight; default 1.0


def validation_error(error: ValidationError) -> ApiError:
    """Pydantic's first complaint as a 400 naming the field (`param`), as OpenAI's API answers a bad parameter."""
    first = error.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first["type"] == "missing":
        message = f"Missing required parameter: {param}"
    else:
        message = f"Invalid value for {param}: {first['msg']}" if param else first["msg"]
    return ApiError(400, message, param=param, code="invalid_value" if first["type"] != "missing" else "missing")


def parse_request(body: Any) -> ImageRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    try:
        return ImageRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
