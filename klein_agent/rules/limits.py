"""Every limit and default a request is checked against, in one place. No torch: the CLI and the server check
arguments with these before a model is loaded.

Values the reference fixes are marked with where it fixes them; the rest are this project's product limits.
"""

from __future__ import annotations

import re

# -- output size ------------------------------------------------------------------------------------------------
SIZE_MULTIPLE = (
    16  # user-given sides: one latent token is 16 px for every klein checkpoint (8x autoencoder, 2x2 patch)
)
MIN_SIDE = 64
MAX_SIDE = 2048
# text-to-image without a size: 64 tokens a side, diffusers' default_sample_size 128 latents over the 2x2 patch
DEFAULT_TOKENS_PER_SIDE = 64
MAX_PIXELS_PER_CALL = 2048 * 2048  # width x height x num_images: the server's default on CUDA, overridable
# The default elsewhere, sized so a call ends inside the ~60 s a client such as Claude Desktop waits. klein 4B
# costs about 46 TFLOP for one 512x512 picture and 153 TFLOP at 1024x1024. The arithmetic, at 2 FLOP per
# multiply-add: every token passes ~3.1 B transformer weights, so a step over 1024 image + 512 text tokens is
# 2 x 3.1e9 x 1536 = 9.5 TFLOP plus 0.7 of attention (28.3 + 6.5 over 4096 + 512 tokens); 4 steps, plus the text
# encoder (27 Qwen3-4B layers of 0.1 B weights over 512 tokens: 2.9) and the decoder (2.5; 10.5 at 1024x1024):
# 4 x 10.2 + 2.9 + 2.5 = 46 and 4 x 34.8 + 2.9 + 10.5 = 153. That is 45-60 s at the 0.8-1 TFLOP/s of float32 a
# desktop CPU sustains, and 10-30 s on an Apple GPU (5-14 TFLOP/s float32). The 9B takes about twice as long.
# Estimates, not measurements.
DEVICE_MAX_PIXELS_PER_CALL = {"cpu": 512 * 512, "mps": 1024 * 1024}


def default_max_pixels(device: str) -> int:
    """The default per-call pixel budget (width x height x num_images) for a model on `device` ("cpu", "mps",
    "cuda", "cuda:1", ...): `DEVICE_MAX_PIXELS_PER_CALL`, else `MAX_PIXELS_PER_CALL` (CUDA and the rest)."""
    return DEVICE_MAX_PIXELS_PER_CALL.get(device.split(":", 1)[0].strip().lower(), MAX_PIXELS_PER_CALL)


# -- references (diffusers Flux2ImageProcessor.check_image_input and Flux2KleinPipeline.__call__) -------------------
REFERENCE_MAX_AREA = 1024 * 1024  # larger references are scaled down (Lanczos) to about this many pixels
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8.0
MAX_REFERENCES = 4  # FLUX.2 [klein]: BFL's API limit for klein and the count its KV benchmarks use; the reference sets none
FLUX3_MAX_REFERENCES = 10  # FLUX 3 [klein]: BFL's "up to 10" (diffusers enforces it in the prompt upsampler)
# The reference limit is the model family's (rules/families.py reads these): the server's input schema takes the
# most any family takes, and each call is checked against the loaded model's.
MAX_REFERENCES_BY_FAMILY = {"flux2": MAX_REFERENCES, "flux3": FLUX3_MAX_REFERENCES}
MOST_REFERENCES = max(MAX_REFERENCES_BY_FAMILY.values())

# -- sampling ---------------------------------------------------------------------------------------------------
# A model's defaults when a call names no steps or guidance. The presets, the checkpoint loader, the help texts and
# the tool descriptions read these; tests/test_defaults.py checks the docs that restate them.
DISTILLED_STEPS = 4  # klein and klein 9B-KV are step-distilled: BFL fixes 4 steps, the model cards use 4
DISTILLED_GUIDANCE = 1.0  # distilled models take no guidance (1 means CFG off)
BASE_STEPS = 50  # klein Base: diffusers Flux2KleinPipeline num_inference_steps
BASE_GUIDANCE = 4.0  # klein Base: diffusers Flux2KleinPipeline guidance_scale (true CFG against "")
MAX_IMAGES_PER_CALL = 4
# FLUX 3 [klein] (diffusers 0.42 modular pipelines): the distilled model is a 16-step flow map without guidance,
# Base runs 50 steps of CFG at the block default 3.5 (`Flux3LoopDenoiser(guidance_scale=3.5)`; BFL's README says
# "CFG 4": we follow the reference implementation, whose pictures the parity tests compare)
FLUX3_DISTILLED_STEPS = 16  # diffusers Flux3DistilledAutoBlocks num_inference_steps
FLUX3_BASE_STEPS = 50  # diffusers Flux3AutoBlocks num_inference_steps
FLUX3_BASE_GUIDANCE = 3.5  # diffusers Flux3LoopDenoiser guidance_scale
FLUX3_SHIFT = 6.93  # diffusers Flux3SetTimestepsStep: the constant schedule shift, no dynamic shifting
FLUX3_TEXT_WINDOW = 80  # diffusers Flux3TextEncoderStep pad_multiple: prompts padded to a multiple of it
FLUX3_MAX_TEXT_TOKENS = 8192  # diffusers Flux3TextEncoderStep max_sequence_length
MAX_STEPS = 100
MIN_GUIDANCE = 1.0  # diffusers: CFG runs only for guidance_scale > 1; 1 means "off"
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1  # seeds are unsigned 32-bit, so a recipe's seed always fits the schema that replays it
RANDOM_SEED_BOUND = 2**31  # a drawn seed leaves room for a batch above it

# -- step caches (per call, off by default) ----------------------------------------------------------------------
# A step cache skips the transformer's blocks at some steps of a many-step run and reuses what they added at the
# last computed step. The rule is diffusers 0.42's MagCache (hooks/mag_cache.py), run by model/step_cache.py:
# after the first RETENTION_RATIO of the steps, a step is skipped while the error accumulated from the magnitude
# ratios since the last computed step stays within the threshold, at most MAX_SKIP_STEPS in a row. Its
# FirstBlockCache is not offered: on FLUX.2 blocks diffusers 0.42.1 raises a TypeError at the first step (its tail
# hook subtracts a list from a tensor), so there is no reference to match. TaylorSeer takes an interval, not a
# threshold, and is not offered yet.
STEP_CACHE_KINDS = ("magcache",)
STEP_CACHE_DEFAULT_THRESHOLD = 0.06  # diffusers MagCacheConfig.threshold
STEP_CACHE_MAX_THRESHOLD = 1.0  # an accumulated error of 1 is a residual off by its own size: beyond any use
MAGCACHE_MAX_SKIP_STEPS = 3  # diffusers MagCacheConfig.max_skip_steps
MAGCACHE_RETENTION_RATIO = 0.2  # diffusers MagCacheConfig.retention_ratio: the first 20% of steps always run

# -- masked edits (diffusers Flux2KleinInpaintPipeline.__call__ defaults) -----------------------------------------
DEFAULT_STRENGTH = 0.8  # how far the masked area is re-noised: 1 starts it from pure noise
INPAINT_DEFAULT_GUIDANCE = (
    8.0  # Base models: the inpaint pipeline's own default scale (edits use BASE_GUIDANCE)
)
MAX_BOXES = 16
MASK_MAX_ASPECT_DIFFERENCE = (
    0.02  # a mask is stretched to the image; more than 2% off means another picture's mask
)
MASK_THRESHOLD = 128  # 8-bit level: >= repaints (the reference binarizes v / 255 at 0.5)

# -- text -------------------------------------------------------------------------------------------------------
MAX_PROMPT_CHARS = 2000  # the text encoder keeps 512 tokens after templating; more text is ignored anyway

# -- the FLUX 3 prompt upsampler (diffusers modular_pipelines/flux3/prompt_upsampler.py, BFL's pup.py) ----------
UPSAMPLER_MAX_NEW_TOKENS = 3584  # diffusers MAX_NEW_TOKENS: the most tokens one caption may take (greedy)
UPSAMPLER_MAX_REFERENCES = 10  # diffusers MAX_REFERENCES: references the upsampler looks at
UPSAMPLER_REFERENCE_MULTIPLE = 32  # a reference's sides, rounded to this, before the upsampler sees it
UPSAMPLER_REFERENCE_MAX_ASPECT = 200  # diffusers MAX_ASPECT_RATIO
# the pixel budget of each reference by how many there are: 1 MP for one, 724² for two, 512² for 3 to 10
UPSAMPLER_REFERENCE_PIXELS = {
    1: 1024 * 1024,
    2: 724 * 724,
    **dict.fromkeys(range(3, UPSAMPLER_MAX_REFERENCES + 1), 512 * 512),
}
UPSAMPLER_JPEG_QUALITY = 92  # references are re-encoded as the upsampler saw them in training
# What a FLUX 3 call encodes when the caller gives no caption: "upsampler" when `--prompt-upsampler` loaded one,
# else the prompt as given (the result says BFL trained on upsampled captions). docs/server.md, Captions.
CAPTION_SOURCES = ("upsampler", "caller", "prompt")
MAX_CAPTION_CHARS = 8000  # a 350-word caption with a box table is ~3,000 characters; 8,000 leaves room
# A FLUX 3 layout (`layout` / --layout: the upsampler's box modes, rules/layout.py). BFL's box tables hold one row
# per object, a scene's handful. An edit's locked row is ~100 characters of JSON plus its label (at most 200): 16
# rows take at most 4,823 characters, leaving MAX_CAPTION_CHARS room for a 3,000-character caption (tests/test_layout).
MAX_LAYOUT_BOXES = 16
# a label names the object ("a red umbrella"); the upsampler (or the caller's caption) writes the long desc
MAX_LAYOUT_LABEL_CHARS = 200
# diffusers CANVAS: the upsampler's box table is integers on a 0-1000 grid, (0, 0) top-left
LAYOUT_CANVAS = 1000
LAYOUT_SAME_BOX_IOU = 0.9  # diffusers reconcile_boxes: a row this close to a locked box is that box, renamed

# -- grouping ---------------------------------------------------------------------------------------------------
SESSION_PATTERN = re.compile(r"[A-Za-z0-9 _.:-]{1,64}", re.ASCII)
SESSION_MAX_CHARS = 64
# An idempotency key (`_meta["klein-agent/idempotency-key"]`, or minted per tools/call): what a client can keep and
# send again; 128 characters hold a UUID, a ULID or a 64-hex digest with room for a prefix.
CALL_ID_MAX_CHARS = 128
CALL_ID_PATTERN = re.compile(rf"[A-Za-z0-9_.:-]{{1,{CALL_ID_MAX_CHARS}}}", re.ASCII)

# -- inputs -----------------------------------------------------------------------------------------------------
INPUT_MAX_BYTES = 32 * 1024**2  # an encoded input: file, decoded data: URI, or URL body
INPUT_MAX_PIXELS = 64 * 1024**2  # width x height from its header, checked before decoding
# What one decode may hold at its peak: the loaded picture, the decoder's own buffers and the RGB result (about
# 1/4 of the 512 MB a call may grow by is left for the rest: the ~1 Mpx preparation, Python, the store).
# A JPEG is decoded at a reduced scale (libjpeg's DCT scaling) when only ~1 Mpx of it will be used, so it never
# comes near this; PNG and WebP have no reduced decode in Pillow, so their pixel caps come from this budget and
# what a full-size decode costs a pixel (measured: tools/bench_bombs.py, docs/benchmarks.md):
# PNG and a JPEG decoded at full size: the decoded picture (4 bytes a pixel: Pillow keeps RGB as RGBX) and the
# RGB result (4); WebP: libwebp's canvas, its lossless decoder's ARGB buffer, the bytes Pillow is handed and the
# picture they are copied into (4 each); the RGB result (4) is made after the ARGB buffer is freed.
FULL_DECODE_BUDGET_BYTES = 400 * 10**6
FULL_DECODE_BYTES_PER_PIXEL = {"PNG": 8, "JPEG": 8, "WEBP": 16}
FULL_DECODE_MAX_PIXELS = {
    fmt: FULL_DECODE_BUDGET_BYTES // per_pixel for fmt, per_pixel in FULL_DECODE_BYTES_PER_PIXEL.items()
}  # PNG 50 Mpx, WebP 25 Mpx, a JPEG that is not reduced 50 Mpx

# -- results ----------------------------------------------------------------------------------------------------
PREVIEW_MAX_EDGE = 1024  # long edge of the inline preview of a tool result
VIEW_MAX_EDGE = 1568  # the most the Anthropic vision models use; view_image may ask for up to this
PREVIEW_BUDGET_B64 = 700_000  # base64 characters for all inline images of one result (Claude Desktop: 1 MB)
MAX_VIEW_IMAGES = 16  # images on one contact sheet

# -- messages ---------------------------------------------------------------------------------------------------
# Every JSON-RPC message the server writes stays under this many bytes. The TypeScript SDK's stdio transport drops
# the connection on a line of 10 MiB; 8 MiB leaves room below it. A resource read whose image does not fit is
# sent as lossless WebP when that fits, else refused with an error that names export_image (docs/server.md).
MAX_MESSAGE_BYTES = 8 * 1024**2
MESSAGE_FRAMING_BYTES = 64 * 1024  # the JSON-RPC envelope, URI, MIME type and _meta around one base64 blob
MAX_MESSAGE_BLOB_BYTES = (
    (MAX_MESSAGE_BYTES - MESSAGE_FRAMING_BYTES) // 4 * 3
)  # binary bytes whose base64 fits

# -- listing ----------------------------------------------------------------------------------------------------
# Images on one page of list_images and of the gallery's /api/images. Each may name up to 256 parents (~7.5 KB of
# 26-character ids), in the text and again in the structured content: 100 such images are ~1.5 MB, inside
# MAX_MESSAGE_BYTES; the store's former 1000 would not be.
MAX_LIST_LIMIT = 100
# A page cursor, as the store writes it: URL-safe base64 of {"v":1,"before":<up to 19 digits>,"session":<a label of
# at most SESSION_MAX_CHARS, or null>}, at most 113 bytes, so 152 characters; a longer one is refused unread.
MAX_CURSOR_CHARS = 256

# -- the server -------------------------------------------------------------------------------------------------
MAX_QUEUE = 8  # calls that may wait behind the running one
STORE_MAX_BYTES = 2 * 1024**3
STORE_MAX_IMAGES = 10_000
# Leases: what keeps a running call's inputs from eviction by any process on the store (service/store/leases.py). No
# call has a bound on its length (a queue of MAX_QUEUE calls, a 9B at 2048x2048 on a CPU: tens of minutes), so no
# expiry can outlast the longest call: a holder renews its leases every LEASE_RENEW_S while it runs, and the
# expiry only has to outlast one late renewal. A renewal waits at most SQLite's busy timeout (30 s, while another
# process writes) plus a pause of the process, so 120 s leaves 75 s of slack past a 15 s interval. It is also how
# long the inputs of a process killed mid-call stay protected: two minutes of a store that may not shrink.
LEASE_TTL_S = 120.0
LEASE_RENEW_S = 15.0

# -- S3 blobs (service/store/s3_blobs.py, `--blobs s3://...`) ----------------------------------------------------------
# One request: connecting may take S3_CONNECT_TIMEOUT_S, the whole request S3_REQUEST_TIMEOUT_S (a 2048x2048 PNG
# is at most ~13 MB: 60 s is 1.7 Mbit/s). obstore retries a read, a refused connection and a 5xx S3_MAX_RETRIES
# times within S3_RETRY_TIMEOUT_S, but never a create-only PUT that timed out (it cannot know whether that one
# landed), so `S3BlobStore.put` retries every transient failure itself, pausing S3_PUT_BACKOFF_S, doubling up to
# S3_PUT_BACKOFF_MAX_S, and starts no try after S3_PUT_DEADLINE_S; a retry answered 412 reads the object back to
# see whether it holds the put's own bytes (the earlier answer was lost). The deadline rides out a blip (a server
# restarting, a lost answer) and keeps a call on an S3 that is down from waiting longer than a user would: past it
# the call fails saying which failure it was, and nothing is stored.
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0
S3_RETRY_TIMEOUT_S = 15.0
S3_MAX_RETRIES = 3
S3_PUT_DEADLINE_S = 15.0
S3_PUT_BACKOFF_S = 0.25
S3_PUT_BACKOFF_MAX_S = 5.0

# -- generator replicas on Ray Serve (klein_agent/replica/, `klein-agent deploy`, `serve --generator ray`) ---------
RAY_APP = "klein"  # the Serve application `deploy` creates and `serve --generator ray` calls, unless named
RAY_DEPLOYMENT = "KleinReplica"  # the deployment inside it (one per application)
# A replica stops a call that runs longer than this, checked at each step: a front-end killed mid-call (Ray does
# not cancel its calls) frees its replica then at the latest. Longer than any call the default pixel budget allows
# on a GPU (seconds), and than a 512x512 tiny-or-4B call on a CPU (minutes).
REPLICA_DEADLINE_S = 600.0
RAY_CONNECT_TIMEOUT_S = 60.0  # `serve --generator ray`: asking the application what model it runs
# How often a front-end asks the application again how many calls it takes at once (`KleinReplica.in_flight`), so a
# redeploy with more or fewer replicas is followed without restarting the front-ends. One small Ray call per period.
RAY_IN_FLIGHT_REFRESH_S = 30.0
# The replicas' gRPC data plane (what `serve --generator ray` sends calls over) takes messages up to gRPC's default
# receive limit, 4 MiB, on both ends (Serve's RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH). A call whose request (its
# references) or whose pictures would be larger goes as Ray tasks and objects instead, which take any size: at
# 1024² one picture is 3 MiB (gRPC), two are 6 MiB (Ray's object store). The margin covers pickling and the rest.
RAY_GRPC_MESSAGE_BYTES = 4 * 1024**2
RAY_GRPC_MARGIN_BYTES = 256 * 1024
# Cache affinity: the router that sends calls with the same references to the replica holding their prepared latents
# (and klein 9B-KV's kept keys and values), whichever front-end they come from; calls without references spread.
RAY_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
# `deploy --autoscale MIN:MAX`: Serve adds replicas while the calls running or waiting per replica stay above
# the target (one call runs at a time, so 1 means "scale as soon as a call waits"), after the upscale delay; it
# removes one after the downscale delay of less work. A klein replica takes seconds to minutes to load, so scaling
# down is slow to avoid paying that again for a short lull.
AUTOSCALE_TARGET_ONGOING = 1
AUTOSCALE_UPSCALE_DELAY_S = 5.0
AUTOSCALE_DOWNSCALE_DELAY_S = 300.0

# -- critique: compare_images, view_image regions, verdicts --------------------------------------------------------
# A token (SIZE_MULTIPLE px square) counts as changed when the mean CIE76 colour difference (ΔE*ab, CIELAB, D65)
# over it is above this. Measured on a 1024² photo with sigma-2 noise standing in for the autoencoder's drift: the
# unchanged pixels' ΔE had p50 1.6 and p99 4.5, and a token's mean lies below its p99; 8 stays above that noise
# and below a visible recolour (ΔE 10 is "clearly different" on the CIE76 scale). Otsu's threshold gave 32: too high.
CHANGE_DELTA_E = 8.0
# ... or when at least this share of its pixels differ by more than twice that (a change covering a sliver of the
# token: 2 of its 16 px columns). Noise never gets there: sigma-2 noise's p99 is 4.5, a quarter of 2 x 8.
CHANGE_MIN_COVER = 1 / 8
# The change map is computed at this long edge at most (a token then covers 8 px of a 1024² picture), which keeps
# a 1024² pair inside 100 ms on two CPU cores; pictures up to it are compared at full resolution.
CHANGE_WORK_EDGE = 512
CHANGE_MAX_REGIONS = 8  # regions listed, largest first; the rest are counted
CHANGE_WHOLE_PCT = 50.0  # changed area at or above which a change is "the whole picture"
CHANGE_UNRELATED_SSIM = 0.3  # with the whole picture changed, SSIM under this means b shares nothing with a
# Changed area outside the box the caller meant to change that still reads as "inside": one token of a 512² picture
# is 0.1 %, so this allows a token or two of spill at a box's edge.
CHANGE_OUTSIDE_TOLERANCE_PCT = 0.5
CHANGE_MAX_ASPECT_DIFFERENCE = (
    0.02  # pictures whose aspect ratios differ more are not one picture's two versions
)
OVERLAY_MAX_BYTES = 100_000  # the change overlay's encoded size (about 25,000 base64 characters at 512 px)
# Decoded pictures compare_images keeps for the next call (an agent compares every edit with the same input): four
# 2048² pictures or sixteen 1024² ones, at Pillow's 4 bytes a pixel.
CRITIQUE_CACHE_BYTES = 64 * 1024**2
ZOOM_MIN_EDGE = 256  # a view_image region smaller than this is enlarged by a whole factor, nearest neighbour

VERDICTS = (
    "pick",
    "reject",
    "note",
)  # pick and reject set an image's standing (the latest wins); notes add up
VERDICT_REASON_MAX_CHARS = 300  # one or two sentences: a card's caption, and a line of list_images
VERDICT_HISTORY_PER_IMAGE = (
    20  # records kept per image, newest first (the standing pick or reject is always kept)
)
VERDICT_NOTES_SHOWN = 3  # newest notes list_images and the gallery show per image
