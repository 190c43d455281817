"""Request and response models of the HTTP API (pydantic): every field checked, unknown fields rejected."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from ..config import SamplingConfig

MAX_PROMPT_CHARS = 500
_BOUNDS = SamplingConfig.BOUNDS  # the sampling settings' ranges, declared once
MAX_SEED = 2**62
# An init image for completion, base64: up to ~1.5 MB of PNG/JPEG (the body limit follows it).
MAX_INIT_IMAGE_CHARS = 2_000_000


def _not_blank(v: str) -> str:
    """A prompt must say something."""
    if not v.strip():
        raise ValueError("prompt must contain more than white space")
    return v


Prompt = Annotated[
    str,
    Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw (1 to 500 characters)"
    ),
    AfterValidator(_not_blank),
]


class _Strict(BaseModel):
    """Base: unknown fields are an error, NaN and infinity are not numbers, and JSON types are not
    coerced ("4" is not a number, true is not 1, 0 is not false)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class GenerateRequest(_Strict):
    """POST /v1/generate (and the query of GET /v1/generate/stream); None means the model's default."""

    prompt: Prompt
    num_images: int = Field(4, ge=1, le=16, description="images to make for the prompt")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="image k gets seed + k; default: a random seed"
    )
    temperature: float | None = Field(
        None, **_BOUNDS["temperature"], description="softmax temperature"
    )
    top_k: int | None = Field(
        None, **_BOUNDS["top_k"], description="keep the k most likely (0: all)"
    )
    top_p: float | None = Field(None, **_BOUNDS["top_p"], description="nucleus sampling mass")
    condition_scale: float | None = Field(
        None, **_BOUNDS["condition_scale"], description="super-conditioning scale (1: off)"
    )
    rerank: bool = Field(True, description="sort the images by CLIP score (when a CLIP is loaded)")
    response: Literal["base64", "url"] = Field(
        "base64", description="images inline as base64 PNG, or as URLs to fetch within a while"
    )
    init_image: str | None = Field(
        None,
        max_length=MAX_INIT_IMAGE_CHARS,
        description="image completion: a PNG, JPEG or WebP file, base64; its top keep_rows rows "
        "of image tokens are kept and the rest is drawn",
    )
    keep_rows: int = Field(
        0, ge=0, le=64, description="token rows of init_image to keep (0: plain generation)"
    )

    def sampling_overrides(self) -> dict[str, float | int]:
        """The sampling settings this request gives (the others stay the model's defaults)."""
        return {k: v for k in SamplingConfig.BOUNDS if (v := getattr(self, k)) is not None}


def query_model(model: type[GenerateRequest]) -> type[GenerateRequest]:
    """The request as URL query parameters, which are all text: numbers and booleans parsed from it."""

    class GenerateQuery(model):  # type: ignore[valid-type,misc]
        model_config = ConfigDict(strict=False)

    GenerateQuery.__doc__ = model.__doc__
    return GenerateQuery


def request_model(max_images: int, default_images: int) -> type[GenerateRequest]:
    """GenerateRequest with this server's bound on num_images (so the OpenAPI schema states it)."""
    return create_model(
        "GenerateRequest",
        __base__=GenerateRequest,
        __doc__=GenerateRequest.__doc__,
        num_images=(
            int,
            Field(
                min(default_images, max_images),
                ge=1,
                le=max_images,
                description=f"images to make for the prompt (1 to {max_images})",
            ),
        ),
    )


class Settings(BaseModel):
    """The settings a request was run with (model defaults filled in)."""

    num_images: int
    seed: int
    temperature: float
    top_k: int
    top_p: float
    condition_scale: float
    rerank: bool
    keep_rows: int = 0


class ImageOut(BaseModel):
    """One image: its seed, CLIP score (null without a reranker) and the PNG inline or as a URL."""

    seed: int
    score: float | None
    base64: str | None = Field(None, description="PNG file bytes, base64")
    url: str | None = Field(None, description="GET this for the PNG (kept for a limited time)")


class GenerateResponse(BaseModel):
    """Images best first (when reranked), with the settings used and the prompt's words the model does not know."""

    prompt: str
    unknown_words: list[str] = Field(
        description="words of the prompt that the model's training captions never used (empty "
        "when the model lists no vocabulary): it reads the prompt without them and draws what it "
        "knows"
    )
    read_as: dict[str, str] = Field(
        default_factory=dict,
        description="words of the prompt that the model reads as words it knows, from its synonym "
        'list (synonyms.json): {"kitty": "cat"}',
    )
    images: list[ImageOut]
    settings: Settings
    model: str
    queued_s: float
    run_s: float


class OriginalRequest(_Strict):
    """The original dalle-mini demo backend's request."""

    prompt: Prompt


class OriginalResponse(BaseModel):
    """The original demo backend's reply: base64-encoded image files and a version string."""

    images: list[str]
    version: str


class ErrorOut(BaseModel):
    """An error: what was wrong, in one line."""

    detail: str


class FieldError(BaseModel):
    """One invalid field: where (field names), what is wrong, pydantic's error type."""

    loc: list[str]
    msg: str
    type: str


class InvalidOut(BaseModel):
    """422: a readable line ('field: what is wrong; ...') and the errors one by one."""

    detail: str
    errors: list[FieldError] = []
