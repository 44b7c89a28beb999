"""Sending mail: the request (request), the message built once (mime), the API's half that
stores and dispatches it (outbox), and the worker's half that sends it and files its Sent
copy exactly once (deliver, sent)."""
