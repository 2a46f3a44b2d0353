"""The text fields of a multipart/form-data request (image edits, transcriptions), read without touching the files.

The gateway reads the few fields it meters on (`model`, `n`, `size`, `quality`, `response_format`, `stream`) and
forwards the body byte for byte. Anything two parsers could read differently is refused: a field the gateway reads
given twice, a part naming itself in an unusual way, a field value that is not UTF-8 text. File parts are skipped as
they stream past; their bytes are never decoded or copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

from metergate.errors import GatewayError

MAX_FIELD_BYTES = 16 * 1024  # a text field the gateway reads (a model name, a size); file parts are unbounded


@dataclass(slots=True)
class Form:
    """The form's text fields (first value of each), and where each read field's value sits in the body."""

    fields: dict[str, str] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    files: int = 0  # file parts seen
    file_bytes: int = 0  # their total size

    def get(self, name: str) -> str | None:
        return self.fields.get(name)


def is_multipart(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


def read_form(content_type: str, body: bytes, read: frozenset[str]) -> Form:
    """The text fields of a multipart body; raises GatewayError(400) on a body a provider could read otherwise."""
    names = [p.split("=", 1)[0].strip().lower() for p in content_type.split(";")[1:]]
    if len(names) != len(set(names)) or any(name.endswith("*") for name in names):
        # `boundary=A; boundary=B`: parsers disagree on which counts, so they would read different parts.
        raise _invalid("its Content-Type repeats a parameter or uses an extended (name*=) one")
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise _invalid("the Content-Type has no boundary")
    delimiter = b"--" + boundary
    if not body.startswith(delimiter) or not body.rstrip(b"\r\n").endswith(delimiter + b"--"):
        # Text before the first delimiter or after the last is ignored by one parser and may be parts to another.
        raise _invalid("it has text before its first boundary or after its closing one")
    form = Form()
    state = _PartState()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        name = state.header_name.strip().lower()
        if name == b"content-disposition":
            if state.disposition is not None:
                raise _invalid("a part has two Content-Disposition headers")
            state.disposition = state.header_value
        state.header_name, state.header_value = b"", b""

    def on_headers_finished() -> None:
        disposition = state.disposition or b""
        kind, options = parse_options_header(disposition)
        raw = disposition.lower()
        if (
            kind != b"form-data"
            or b"name*" in raw
            or b"filename*" in raw
            or raw.count(b"name=") > 1 + raw.count(b"filename=")
        ):
            raise _invalid("a part's Content-Disposition is not a plain form-data name")
        state.name = options.get(b"name", b"").decode("latin-1")
        state.is_file = b"filename" in options
        if state.is_file:
            form.files += 1
        state.reading = state.name in read and not state.is_file
        if state.name in read and state.is_file:
            raise _invalid(f"the field {state.name!r} is sent as a file")
        if state.reading and state.name in form.spans:
            raise _invalid(f"the field {state.name!r} is given twice")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state.is_file:
            form.file_bytes += end - start
        if not state.reading:
            return
        if state.value_start is None:
            state.value_start = state.offset + start
        state.value += data[start:end]
        if len(state.value) > MAX_FIELD_BYTES:
            raise _invalid(f"the field {state.name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end() -> None:
        if state.reading:
            try:
                value = state.value.decode()
            except UnicodeDecodeError:
                raise _invalid(f"the field {state.name!r} is not UTF-8 text") from None
            start = state.value_start if state.value_start is not None else 0
            form.fields[state.name] = value
            form.spans[state.name] = (start, start + len(state.value))
        state.reset()

    def on_end() -> None:
        state.ended = True

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
        max_header_count=32,
    )
    try:
        # One write: the callbacks' offsets are then offsets into the body itself.
        parser.write(body)
        parser.finalize()
    except GatewayError:
        raise
    except Exception as exc:  # the library's parse errors (MultipartParseError and others)
        raise _invalid(f"it cannot be parsed ({type(exc).__name__})") from None
    if not state.ended:
        raise _invalid("it ends before its closing boundary")
    return form


@dataclass(slots=True)
class _PartState:
    header_name: bytes = b""
    header_value: bytes = b""
    disposition: bytes | None = None
    name: str = ""
    is_file: bool = False
    reading: bool = False
    value: bytes = b""
    value_start: int | None = None
    offset: int = 0
    ended: bool = False

    def reset(self) -> None:
        self.disposition, self.name, self.is_file, self.reading = None, "", False, False
        self.value, self.value_start = b"", None


def replace_field(body: bytes, form: Form, name: str, value: str) -> bytes:
    """The body with one read field's value replaced (a model alias), every other byte unchanged."""
    start, end = form.spans[name]
    return body[:start] + value.encode() + body[end:]


def _invalid(why: str) -> GatewayError:
    return GatewayError(400, "invalid_multipart", f"The multipart/form-data body cannot be forwarded: {why}.")
