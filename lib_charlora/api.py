"""HTTP API: /charlora/v1/... on the WebUI's FastAPI app (registered in ``on_app_started``).

Honours ``--api-auth user:pass[,user:pass]`` with HTTP Basic, as the WebUI's own API does.
Bodies are parsed by us (not pydantic models), so the same code runs on pydantic 1 (A1111,
reForge) and 2 (Forge).
"""
import secrets

from .engine.dataset import DatasetError
from .engine.errors import CharLoraError, ConfigError

PREFIX = "/charlora/v1"


def _credentials(api_auth):
    creds = {}
    for pair in (api_auth or "").split(","):
        if ":" in pair:
            user, password = pair.strip().split(":", 1)
            creds[user] = password
    return creds


def register(app, service, api_auth=None):
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    dependencies = []
    creds = _credentials(api_auth)
    if creds:
        basic = HTTPBasic()

        def auth(credentials: HTTPBasicCredentials = Depends(basic)):
            expected = creds.get(credentials.username)
            if expected is None or not secrets.compare_digest(credentials.password, expected):
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

    def handler(action):
        """A POST route: JSON body -> ``action(body)`` -> its answer, or a 422 naming the problem."""
        async def route(request: Request):
            try:
                body = await request.json()
            except Exception:
                return error(422, "the body must be JSON", "body")
            try:
                return action(body)
            except ConfigError as e:
                return error(422, str(e), e.field)
            except DatasetError as e:
                return error(422, str(e), "images", e.report)
            except CharLoraError as e:  # e.g. the loaded model cannot be trained
                return error(422, str(e))
        return route

    def train(body):
        job = service.submit(body)
        return {"job_id": job.id, "warnings": job.warnings}

    def evaluate(body):
        job = service.submit_evaluation(body)
        return {"job_id": job.id, "pictures": job.total_steps, "warnings": job.warnings}

    def jobs():
        return {"jobs": [j.to_dict() for j in service.runner.list()]}

    def job(job_id: str):
        j = service.runner.get(job_id)
        if j is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id}")
        return j.to_dict()

    async def stop(job_id: str, request: Request):
        try:
            body = await request.json()
        except Exception:
            body = {}
        save = body.get("save", True) if isinstance(body, dict) else True
        if not isinstance(save, bool):
            return error(422, "save: must be true or false", "save")
        j = service.runner.stop(job_id, save=save)
        if j is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id}")
        return j.to_dict()

    app.add_api_route(f"{PREFIX}/train", handler(train), methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/evaluate", handler(evaluate), methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/promote", handler(lambda body: service.promote(body)), methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs", jobs, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}", job, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}/stop", stop, methods=["POST"], dependencies=dependencies)
