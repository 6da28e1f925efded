"""schemathesis hooks for .ci/api-check.

- The chunk routes' frames (application/x-kiln-chunks) are sent as the bytes generated.
- Long polls wait at most a second: a claim, offer, event or log read may otherwise be
  held for up to 120 s when nothing comes, by design, and the check has minutes. Event
  streams (paths ending in /stream) follow for at most a second too, where they would
  follow for 300 s when no wait is given.
- One more check: a refusal's code is one the description lists (in x-kiln-codes) for
  its status on that operation.
"""

import json

import schemathesis

LONG_POLL_WAIT_SECS = 1


@schemathesis.serializer("application/x-kiln-chunks")
def chunk_frames(ctx, value):
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    return {"data": value}


def _shorter(wait):
    if isinstance(wait, bool):
        return wait
    if isinstance(wait, int):
        return min(wait, LONG_POLL_WAIT_SECS)
    if isinstance(wait, str) and wait.isdigit():
        return str(min(int(wait), LONG_POLL_WAIT_SECS))
    return wait


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if isinstance(case.body, dict) and "wait_secs" in case.body:
        case.body["wait_secs"] = _shorter(case.body["wait_secs"])
    if isinstance(case.query, dict) and "wait" in case.query:
        case.query["wait"] = _shorter(case.query["wait"])
    if case.operation.path.endswith("/stream"):
        query = case.query if isinstance(case.query, dict) else {}
        query.setdefault("wait", LONG_POLL_WAIT_SECS)
        case.query = query


@schemathesis.check
def refusal_code_is_listed(ctx, response, case):
    listed = case.operation.definition.raw.get("responses", {}).get(
        str(response.status_code), {}
    ).get("x-kiln-codes")
    if listed is None:
        return None
    try:
        code = json.loads(response.content).get("code")
    except (ValueError, AttributeError):
        # Not a JSON object: response_schema_conformance says so.
        return None
    if code not in listed:
        raise AssertionError(
            f"{response.status_code} with code {code!r}, which the description does not "
            f"list for {case.operation.label} (it lists {', '.join(listed)})"
        )
    return True
