"""HTTP API: /charlora/v1/... on the WebUI's FastAPI app (registered in ``on_app_started``).

Honours ``--api-auth user:pass[,user:pass]`` with HTTP Basic, as the WebUI's own API does. A body is read
by us, not by FastAPI, so the errors have one shape on pydantic 1 (A1111, reForge) and 2 (Forge):
``{"detail": text, "field": name, "report": intake report}`` (field and report where they apply), with 413
(too large), 415 (not JSON), 403 (server folders not allowed), 404 (no such job) or 422 (anything else).
In order: credentials, size (before reading it whole), content type, strict JSON (no duplicated keys, no
NaN), the request model of ``api_models`` (what /docs shows), then the service's own checks. Requests run in
the thread pool, so decoding pictures never stalls the WebUI's other requests.
"""
import json
import secrets

from . import api_models as models
from .engine.dataset import DatasetError
from .engine.errors import CharLoraError, ConfigError
from .limits import over

PREFIX = "/charlora/v1"
JSON_TYPES = ("application/json",)


class UnsupportedMediaType(ConfigError):
    status = 415


def _credentials(api_auth):
    creds = {}
    for pair in (api_auth or "").split(","):
        if ":" in pair:
            user, password = pair.strip().split(":", 1)
            creds[user] = password
    return creds


def _pairs(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(key, "appears twice in the JSON object; give every field once")
        seen[key] = value
    return seen


def _constant(name):
    raise ConfigError("body", f"{name} is not a JSON number")


def _integer(digits):
    if len(digits) > 40:  # no field takes more than 2**64; Python would refuse past 4300 digits anyway
        raise ConfigError("body", f"a number of {len(digits)} digits is far out of any field's range")
    return int(digits)


def parse_json(data, content_type, optional=False):
    """Request bytes -> the JSON value, or a ConfigError (UnsupportedMediaType for a non-JSON type)."""
    if not data.strip():
        if optional:
            return {}
        raise ConfigError("body", "is empty; send a JSON object")
    media = (content_type or "").split(";")[0].strip().lower()
    if media and media not in JSON_TYPES and not media.endswith("+json"):
        raise UnsupportedMediaType("body", f"Content-Type is {media!r}; send JSON with Content-Type: application/json")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("body", "must be JSON in UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_int=_integer)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError("body", "is nested too deeply") from None
    except ValueError as e:
        raise ConfigError("body", f"the body must be JSON ({e})") from None


def register(app, service, api_auth=None, folder_refusal=None):
    """``folder_refusal()`` -> None, or why an ``image_dir`` request is refused on this WebUI (403)."""
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from starlette.concurrency import run_in_threadpool

    dependencies = []
    creds = _credentials(api_auth)
    if creds:
        basic = HTTPBasic()

        def auth(credentials: HTTPBasicCredentials = Depends(basic)):
            expected = creds.get(credentials.username)
            if expected is None or not secrets.compare_digest(credentials.password.encode(), expected.encode()):
                raise HTTPException(status_code=401, detail="Incorrect username or password",
                                    headers={"WWW-Authenticate": "Basic"})
            return True
        dependencies = [Depends(auth)]

    def error(status, message, field=None, report=None):
        body = {"detail": message}
        if field:
            body["field"] = field
        if report is not None:
            body["report"] = report.to_dict() if hasattr(report, "to_dict") else report
        return JSONResponse(status_code=status, content=body)

    async def read(request, optional=False):
        limit_mb = service.limits()["max_request_mb"]
        limit = limit_mb * 2**20
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise over("max_request_mb", "body", f"the request of {int(length) / 2**20:.1f} MB", limit_mb, 413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise over("max_request_mb", "body", "the request body", limit_mb, 413)
        return parse_json(bytes(data), request.headers.get("content-type"), optional)

    async def answer(request, model, action, optional=False):
        try:
            body = await read(request, optional)
            models.check(model, body)
            if isinstance(body, dict) and body.get("image_dir") is not None and folder_refusal is not None:
                why = folder_refusal()
                if why:
                    return error(403, f"image_dir: {why}", "image_dir")
            return await run_in_threadpool(action, body)
        except DatasetError as e:
            return error(422, str(e), "images", e.report)
        except ConfigError as e:
            return error(getattr(e, "status", 422), str(e), e.field)
        except CharLoraError as e:  # e.g. the loaded model cannot be trained
            return error(422, str(e))

    def train(body):
        job = service.submit(body)
        return {"job_id": job.id, "warnings": job.warnings}

    def evaluate(body):
        job = service.submit_evaluation(body)
        return {"job_id": job.id, "pictures": job.total_steps, "warnings": job.warnings}

    async def train_route(request: Request):
        return await answer(request, models.TrainRequest, train)

    async def evaluate_route(request: Request):
        return await answer(request, models.EvaluateRequest, evaluate)

    async def promote_route(request: Request):
        return await answer(request, models.PromoteRequest, service.promote)

    def jobs():
        return {"jobs": [j.to_dict() for j in service.runner.list()]}

    def job(job_id: str):
        j = service.runner.get(job_id)
        return error(404, f"no job {job_id}", "job_id") if j is None else j.to_dict()

    async def stop(job_id: str, request: Request):
        def act(body):
            j = service.runner.stop(job_id, save=body.get("save", True))
            return error(404, f"no job {job_id}", "job_id") if j is None else j.to_dict()
        return await answer(request, models.StopRequest, act, optional=True)

    errors = {status: {"model": models.ErrorAnswer, "description": text} for status, text in (
        (401, "Credentials missing or wrong (only with --api-auth)."),
        (403, "A server folder was asked for where reading server folders is not allowed."),
        (404, "No such job."),
        (413, "The request is larger than a limit in Settings > Character LoRA."),
        (415, "The body is not JSON."),
        (422, "A field is wrong: 'field' names it, 'detail' says what to change; 'report' lists the pictures."))}

    def route(path, endpoint, method, summary, response, request_model=None, codes=(401, 413, 415, 422),
              optional=False):
        extra = None
        if request_model is not None:
            extra = {"requestBody": {"required": not optional, "content": {
                "application/json": {"schema": models.schema(request_model, getattr(app, "openapi_version", "3.1.0"))}}}}
        app.add_api_route(f"{PREFIX}{path}", endpoint, methods=[method], dependencies=dependencies,
                          summary=summary, description=(request_model or response).__doc__ or "",
                          response_model=response, responses={c: errors[c] for c in codes},
                          openapi_extra=extra, tags=["Character LoRA"])

    route("/train", train_route, "POST", "Train a character LoRA", models.TrainAccepted, models.TrainRequest,
          (401, 403, 413, 415, 422))
    route("/evaluate", evaluate_route, "POST", "Test a LoRA's checkpoints", models.EvaluateAccepted,
          models.EvaluateRequest, (401, 403, 413, 415, 422))
    route("/promote", promote_route, "POST", "Make a checkpoint the LoRA's file", models.PromoteAnswer,
          models.PromoteRequest)
    route("/jobs", jobs, "GET", "All jobs, oldest first", models.JobList, codes=(401,))
    route("/jobs/{job_id}", job, "GET", "One job", models.JobAnswer, codes=(401, 404))
    route("/jobs/{job_id}/stop", stop, "POST", "Stop a job (save or cancel)", models.JobAnswer, models.StopRequest,
          (401, 404, 413, 415, 422), optional=True)
