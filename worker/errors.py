"""The worker's one exception for requests it refuses (the gRPC servicer maps it to INVALID_ARGUMENT)."""


class RequestError(ValueError):
    """A request the runner cannot execute (unknown id, too few blocks, bad slot or generation); the
    message names the request, or the adapter and slot."""
