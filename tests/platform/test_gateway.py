"""The gateway over real gRPC: statuses for every kind of bad call, quotas, isolation, cancellation, fuzzing.

One server per module (SmolLM2 in this process, SQLite in a temp dir; PostgreSQL when
GARRISON_TEST_POSTGRES_URL is set), called through grpc's own stubs, as any client would.
"""

from __future__ import annotations

import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import event

from conftest import postgres_schema_url, save_tiny_llama, save_word_tokenizer
from garrison.client import GarrisonClient
from garrison.serving.background import BackgroundServer
from garrison.serving.config import EngineConfig, ModelDeploymentConfig, ServeConfig, TelemetryConfig
from garrison.v1 import admin_pb2, admin_pb2_grpc, inference_pb2 as pb, inference_pb2_grpc, usage_pb2

MODEL = "smollm2"
MAX_REQUEST_BYTES = 64 << 10
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


SPANS = InMemorySpanExporter()


@pytest.fixture(scope="module")
def database_url():
    with postgres_schema_url() as url:  # None: SQLite under the data dir
        yield url


# A tiny model whose chat template never ends: 10**10 empty loop turns, all within the sandbox's range limit.
HOSTILE = "hostile"
HOSTILE_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path: Path, database_url: str | None):
    data_dir = tmp_path_factory.mktemp("gateway")
    hostile = save_word_tokenizer(save_tiny_llama(tmp_path_factory.mktemp("hostile")), 320, HOSTILE_TEMPLATE)
    small = EngineConfig(kv_cache_bytes=16 << 20, max_num_seqs=4, max_num_batched_tokens=64)
    config = ServeConfig(data_dir=data_dir, listen="127.0.0.1:0", max_request_bytes=MAX_REQUEST_BYTES,
                         database_url=database_url,
                         telemetry=TelemetryConfig(prometheus_listen="127.0.0.1:0"),
                         models=(ModelDeploymentConfig(MODEL, str(smollm2_path), on_ray=False, engine=EngineConfig(
                             kv_cache_bytes=96 << 20, max_num_seqs=8, max_num_batched_tokens=256)),
                                 ModelDeploymentConfig(HOSTILE, str(hostile), on_ray=False, engine=small)))
    with BackgroundServer(config, span_exporter=SPANS) as background:
        yield background


@pytest.fixture(scope="module")
def channel(server: BackgroundServer):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def admin(server: BackgroundServer) -> admin_pb2_grpc.AdminStub:
    return GarrisonClient(server.address, key_file=server.server.config.data_dir / "admin.key").admin


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def new_tenant(admin, models=(MODEL,), **limits) -> tuple[str, str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    admin.create_tenant(name=name, models=list(models), quota=admin_pb2.Quota(tenant=name, **limits))
    return name, admin.create_api_key(tenant=name).secret


def generate(channel, key: str | None, request: pb.GenerateRequest, timeout: float = 120) -> list[pb.GenerateResponse]:
    stub = inference_pb2_grpc.InferenceStub(channel)
    return list(stub.Generate(request, metadata=bearer(key) if key else (), timeout=timeout))


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def error_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_generate_streams_an_answer_with_usage(channel, admin) -> None:
    _, key = new_tenant(admin)
    pieces = generate(channel, key, pb.GenerateRequest(model=MODEL, messages=PROMPT, max_tokens=12))
    text = "".join(p.text for p in pieces)
    assert "Paris" in text
    assert len({p.id for p in pieces}) == 1 and pieces[0].id.startswith("req-")
    assert all(p.finish_reason == pb.FINISH_REASON_UNSPECIFIED for p in pieces[:-1])
    last = pieces[-1]
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    tokens = [t for p in pieces for t in p.token_ids]
    assert last.usage.output_tokens == len(tokens)
    prompt_ids = inference_pb2_grpc.InferenceStub(channel).Tokenize(
        pb.TokenizeRequest(model=MODEL, messages=PROMPT), metadata=bearer(key)).token_ids
    assert last.usage.prompt_tokens == len(prompt_ids)
    # The same prompt as token ids gives the same greedy answer.
    again = generate(channel, key, pb.GenerateRequest(model=MODEL, token_ids=prompt_ids, max_tokens=12))
    assert [t for p in again for t in p.token_ids] == tokens


def test_keys_and_grants_are_enforced(channel, admin) -> None:
    name, key = new_tenant(admin, models=())
    request = pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=2)
    assert status_of(lambda: generate(channel, None, request)) == grpc.StatusCode.UNAUTHENTICATED
    assert status_of(lambda: generate(channel, "gk_00000000_" + "A" * 43, request)) == grpc.StatusCode.UNAUTHENTICATED
    code, message = error_of(lambda: generate(channel, key, request))
    assert code == grpc.StatusCode.PERMISSION_DENIED and MODEL in message
    admin.grant_model(tenant=name, model=MODEL)
    assert generate(channel, key, request)[-1].usage.output_tokens == 2
    key_id = key[:11]
    admin.revoke_api_key(id=key_id)
    assert status_of(lambda: generate(channel, key, request)) == grpc.StatusCode.UNAUTHENTICATED
    other_name, other_key = new_tenant(admin)
    admin.delete_tenant(name=other_name)
    assert status_of(lambda: generate(channel, other_key, request)) == grpc.StatusCode.UNAUTHENTICATED


def test_the_admin_api_refuses_tenant_keys_and_tenants_see_only_their_own_usage(channel, admin, server) -> None:
    a_name, a_key = new_tenant(admin)
    b_name, _ = new_tenant(admin)
    tenant_admin = admin_pb2_grpc.AdminStub(channel)
    for call in (lambda: tenant_admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=bearer(a_key)),
                 lambda: tenant_admin.SetQuota(admin_pb2.SetQuotaRequest(quota=admin_pb2.Quota(
                     tenant=b_name, max_concurrent_requests=1)), metadata=bearer(a_key)),
                 lambda: tenant_admin.DeleteTenant(admin_pb2.DeleteTenantRequest(name=b_name), metadata=bearer(a_key)),
                 lambda: tenant_admin.GetUsage(usage_pb2.GetUsageRequest(tenant=a_name), metadata=bearer(a_key))):
        assert status_of(call) == grpc.StatusCode.PERMISSION_DENIED
    inference = inference_pb2_grpc.InferenceStub(channel)
    generate(channel, a_key, pb.GenerateRequest(model=MODEL, prompt="Hello", max_tokens=2))
    assert status_of(lambda: inference.GetUsage(usage_pb2.GetUsageRequest(tenant=b_name), metadata=bearer(a_key))
                     ) == grpc.StatusCode.PERMISSION_DENIED
    deadline = time.monotonic() + 10  # usage is written just after the stream ends
    while True:
        rows = inference.GetUsage(usage_pb2.GetUsageRequest(), metadata=bearer(a_key)).rows
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(r.tenant, r.requests, r.output_tokens) for r in rows] == [(a_name, 1, 2)]
    assert admin.get_quota(tenant=b_name).max_concurrent_requests == 0  # B untouched

    # An admin key runs no inference.
    admin_key = (server.server.config.data_dir / "admin.key").read_text().strip()
    code, message = error_of(lambda: generate(channel, admin_key, pb.GenerateRequest(model=MODEL, prompt="Hi")))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin key" in message


def text_of(pieces: list[pb.GenerateResponse]) -> str:
    return "".join(p.text for p in pieces)


# Each valid, each at an extreme: a temperature that divides logits past float32's range, a top_p below any
# probability, top_k and seed at their largest.
EXTREME_SAMPLING = [dict(temperature=1e-38), dict(temperature=1.4e-45, top_p=1.4e-45),
                    dict(temperature=100.0, top_k=2**31 - 1, seed=2**64 - 1, logprobs=True),
                    dict(temperature=1e-30, top_p=1e-30, top_k=1, seed=0)]


def test_extreme_sampling_values_beside_another_tenants_stream(channel, admin) -> None:
    """Another tenant's stream, in the same batch as requests at every extreme the API accepts, reads exactly as
    it does alone; the extreme requests get tokens too."""
    _, quiet = new_tenant(admin)
    _, wild = new_tenant(admin)
    request = pb.GenerateRequest(model=MODEL, messages=PROMPT, max_tokens=24)
    alone = text_of(generate(channel, quiet, request))
    with ThreadPoolExecutor(len(EXTREME_SAMPLING) + 1) as pool:
        beside = pool.submit(generate, channel, quiet, request)
        extremes = [pool.submit(generate, channel, wild, pb.GenerateRequest(
            model=MODEL, prompt="Once upon a time", max_tokens=16, **values)) for values in EXTREME_SAMPLING]
        assert text_of(beside.result()) == alone
        for extreme in extremes:
            pieces = extreme.result()
            assert pieces[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
            assert pieces[-1].usage.output_tokens >= 1


def test_an_empty_model_lists_the_models_the_tenant_may_use(channel, admin) -> None:
    _, key = new_tenant(admin)
    stub = inference_pb2_grpc.InferenceStub(channel)
    for call in (lambda: generate(channel, key, pb.GenerateRequest(prompt="Hi")),
                 lambda: stub.Tokenize(pb.TokenizeRequest(text="Hi"), metadata=bearer(key))):
        code, message = error_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "set model" in message
        assert MODEL in message and HOSTILE not in message  # granted only smollm2


def test_unknown_keys_are_refused_without_a_database_round_trip(channel, server) -> None:
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    engine = server.server.tenancy.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        for _ in range(200):
            unknown = f"gk_{uuid.uuid4().hex[:8]}_{'C' * 43}"
            assert status_of(lambda: generate(channel, unknown, pb.GenerateRequest(model=MODEL, prompt="Hi"))) == \
                grpc.StatusCode.UNAUTHENTICATED
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert not [s for s in statements if "api_keys" in s], statements


def test_health_answers_while_a_hostile_chat_template_renders(channel, admin) -> None:
    """The template renders in a process of its own, off the event loop: health checks and another tenant's
    chat go on meanwhile, and the request is refused once the render passes its time limit."""
    _, key = new_tenant(admin, models=(MODEL, HOSTILE))
    _, other = new_tenant(admin)
    health = health_pb2_grpc.HealthStub(channel)
    with ThreadPoolExecutor(2) as pool:
        hostile = pool.submit(error_of, lambda: generate(channel, key, pb.GenerateRequest(
            model=HOSTILE, messages=[pb.ChatMessage(role="user", content="w3 w4")], max_tokens=2)))
        chat = pool.submit(generate, channel, other, pb.GenerateRequest(model=MODEL, messages=PROMPT, max_tokens=8))
        slowest = 0.0
        while not hostile.done():
            began = time.monotonic()
            assert health.Check(health_pb2.HealthCheckRequest(service="garrison.v1.Inference"), timeout=10).status \
                == health_pb2.HealthCheckResponse.SERVING
            slowest = max(slowest, time.monotonic() - began)
            time.sleep(0.05)
        code, message = hostile.result()
        assert "Paris" in text_of(chat.result())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "took longer than" in message
    assert slowest < 0.5, slowest


def test_two_tenants_never_share_prefix_cache_blocks(channel, admin) -> None:
    _, a_key = new_tenant(admin)
    _, b_key = new_tenant(admin)
    prompt = "A long shared preamble about the history of Paris, " * 4  # several 16-token blocks
    request = pb.GenerateRequest(model=MODEL, prompt=prompt, max_tokens=2)
    first = generate(channel, a_key, request)[-1].usage
    again = generate(channel, a_key, request)[-1].usage
    other = generate(channel, b_key, request)[-1].usage
    assert first.cached_prompt_tokens == 0 and again.cached_prompt_tokens >= 32  # A reuses its own blocks
    assert other.cached_prompt_tokens == 0  # B computes its own, though the prompt is the same


def test_quota_limits_answer_resource_exhausted_or_invalid_argument(channel, admin, server) -> None:
    name, key = new_tenant(admin, max_concurrent_requests=1, max_prompt_tokens=64, max_new_tokens=200)
    stub = inference_pb2_grpc.InferenceStub(channel)
    long_call = stub.Generate(pb.GenerateRequest(model=MODEL, prompt="Count to one hundred:", max_tokens=200),
                              metadata=bearer(key))
    next(long_call)  # streaming: holds the tenant's only slot
    code, message = error_of(lambda: generate(channel, key, pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=2)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_requests" in message
    long_call.cancel()
    code, message = error_of(lambda: generate(channel, key, pb.GenerateRequest(
        model=MODEL, prompt="word " * 100, max_tokens=2)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_tokens" in message
    code, message = error_of(lambda: generate(channel, key, pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=201)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in message

    name, key = new_tenant(admin, tokens_per_minute=100)
    generate(channel, key, pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=60))
    with pytest.raises(grpc.RpcError) as info:
        generate(channel, key, pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=60))
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens_per_minute" in err.details()
    assert "retry in" in err.details() and float(dict(err.trailing_metadata())["retry-after"]) > 0
    wait_until_idle(server)


INVALID = [
    ("negative max_tokens", pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=-1), "max_tokens"),
    ("zero max_tokens", pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=0), "max_tokens"),
    ("NaN temperature", pb.GenerateRequest(model=MODEL, prompt="Hi", temperature=math.nan), "temperature"),
    ("infinite temperature", pb.GenerateRequest(model=MODEL, prompt="Hi", temperature=math.inf), "temperature"),
    ("top_p zero", pb.GenerateRequest(model=MODEL, prompt="Hi", top_p=0), "top_p"),
    ("negative top_k", pb.GenerateRequest(model=MODEL, prompt="Hi", top_k=-3), "top_k"),
    ("no prompt", pb.GenerateRequest(model=MODEL), "exactly one"),
    ("two prompts", pb.GenerateRequest(model=MODEL, prompt="Hi", token_ids=[1, 2]), "exactly one"),
    ("token outside vocab", pb.GenerateRequest(model=MODEL, token_ids=[1, 10**9]), "vocabulary"),
    ("bad role", pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role="wizard", content="x")]), "role"),
    ("empty stop", pb.GenerateRequest(model=MODEL, prompt="Hi", stop=[""]), "stop"),
    ("over the context", pb.GenerateRequest(model=MODEL, prompt="word " * 3000, max_tokens=2), "tokens"),
    ("max_tokens over the context", pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=100_000), "context"),
]


@pytest.mark.parametrize("request_, expected", [(r, e) for _, r, e in INVALID], ids=[i for i, _, _ in INVALID])
def test_bad_fields_are_invalid_argument(channel, admin, request_: pb.GenerateRequest, expected: str) -> None:
    _, key = new_tenant(admin)
    code, message = error_of(lambda: generate(channel, key, request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in message


def test_one_trace_per_request_and_prometheus_metrics(channel, admin, server) -> None:
    name, key = new_tenant(admin, tokens_per_minute=12)
    SPANS.clear()
    request = pb.GenerateRequest(model=MODEL, token_ids=[1, 2], max_tokens=8)  # reserves 10 of the 12
    pieces = generate(channel, key, request)
    assert pieces[-1].usage.output_tokens >= 3  # so at least 5 stay charged to this minute
    assert status_of(lambda: generate(channel, key, request)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    spans = [s for s in SPANS.get_finished_spans() if s.name != "gateway.Generate"
             or s.attributes.get("garrison.request_id") == pieces[0].id]
    served = {s.name: s for s in spans if s.context.trace_id == spans[0].context.trace_id}
    assert set(served) == {"gateway.Generate", "router.queue", "worker.engine"}
    root = served["gateway.Generate"]
    assert root.attributes["garrison.tenant"] == name and root.parent is None
    assert served["router.queue"].parent.span_id == root.context.span_id
    assert served["worker.engine"].parent.span_id == root.context.span_id

    import urllib.request

    port = server.server.telemetry.prometheus_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    tenant_label = f'tenant="{name}"'
    for metric in ("garrison_time_to_first_token_seconds_bucket", "garrison_time_per_output_token_seconds_bucket",
                   "garrison_tokens_total", "garrison_requests_total", "garrison_rejections_total"):
        assert any(line.startswith(metric) and tenant_label in line for line in body.splitlines()), metric
    assert 'limit="tokens_per_minute"' in body
    for gauge in ("garrison_queue_depth", "garrison_kv_cache_usage"):
        assert any(line.startswith(gauge) for line in body.splitlines()), gauge


def raw_generate(channel, key: str, payload: bytes) -> list[pb.GenerateResponse]:
    call = channel.unary_stream("/garrison.v1.Inference/Generate", request_serializer=None,
                                response_deserializer=pb.GenerateResponse.FromString)
    return list(call(payload, metadata=bearer(key), timeout=60))


def test_invalid_utf8_and_oversized_requests_are_invalid_argument(channel, admin) -> None:
    _, key = new_tenant(admin)
    good = pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=1).SerializeToString()
    assert raw_generate(channel, key, good)[-1].usage.output_tokens == 1
    bad_utf8 = good.replace(b"Hi", b"\xff\xfe")
    code, message = error_of(lambda: raw_generate(channel, key, bad_utf8))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in message
    huge = pb.GenerateRequest(model=MODEL, prompt="a" * (MAX_REQUEST_BYTES + 10)).SerializeToString()
    code, message = error_of(lambda: raw_generate(channel, key, huge))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and str(MAX_REQUEST_BYTES) in message


def wait_until_idle(server: BackgroundServer, timeout: float = 10.0) -> None:
    router, quotas = server.server.router, server.server.quotas
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = router.load(MODEL)
        if load.in_flight == 0 and load.queued == 0 and load.kv_blocks_used == 0 and quotas.total_in_flight() == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"not idle after {timeout} s: {router.load(MODEL)}, quota slots {quotas.total_in_flight()}")


def test_a_cancelled_stream_frees_its_slot_and_blocks_at_once(channel, admin, server) -> None:
    _, key = new_tenant(admin, max_concurrent_requests=1)
    stub = inference_pb2_grpc.InferenceStub(channel)
    story = [pb.ChatMessage(role="user", content="Write a very long essay on the history of France.")]
    call = stub.Generate(pb.GenerateRequest(model=MODEL, messages=story, max_tokens=500), metadata=bearer(key))
    next(call)
    next(call)
    load = server.server.router.load(MODEL)
    assert load.in_flight == 1 and load.kv_blocks_used > 0
    cancelled_at = time.monotonic()
    call.cancel()
    wait_until_idle(server, timeout=2.0)
    assert time.monotonic() - cancelled_at < 2.0
    # The slot is back: the tenant (limit 1) can run its next request.
    assert generate(channel, key, pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=1))[-1].usage.output_tokens == 1


ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}

messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["system", "user", "assistant", "tool", ""]),
                              content=st.text(max_size=40)), max_size=3)
requests = st.builds(
    pb.GenerateRequest,
    model=st.sampled_from([MODEL, "", "no-such-model"]),
    prompt=st.text(max_size=60), messages=messages,
    token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=8),
    max_tokens=st.one_of(st.none(), st.integers(-2**31, 2**31 - 1), st.integers(1, 3)),
    temperature=st.one_of(st.none(), st.floats(width=32), st.floats(0, 2, width=32)),
    top_p=st.one_of(st.none(), st.floats(width=32)), top_k=st.one_of(st.none(), st.integers(-2**31, 2**31 - 1)),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)), stop=st.lists(st.text(max_size=5), max_size=3),
    logprobs=st.booleans())


@pytest.fixture(scope="module")
def fuzz_key(admin) -> str:
    return new_tenant(admin, max_new_tokens=3)[1]  # unset max_tokens then means 3: keeps each case short


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_fuzzed_requests_never_get_internal_errors(channel, fuzz_key: str, request: pb.GenerateRequest) -> None:
    try:
        generate(channel, fuzz_key, request, timeout=60)
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=200))
def test_fuzzed_bytes_never_get_internal_errors(channel, fuzz_key: str, payload: bytes) -> None:
    try:
        raw_generate(channel, fuzz_key, payload)
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())


def test_the_asyncio_client_streams_and_administers(server, admin) -> None:
    import asyncio

    from garrison.client import AsyncGarrisonClient, ClientError

    _, key = new_tenant(admin)

    async def main() -> tuple[str, list[str], grpc.StatusCode, int]:
        async with AsyncGarrisonClient(server.address, key=key) as client:
            pieces = [p.text async for p in client.generate(MODEL, messages=PROMPT, max_tokens=12)]
            models = [m.name for m in await client.list_models()]
            try:
                await client.admin.list_tenants()
                code = grpc.StatusCode.OK
            except ClientError as err:
                code = err.code
        async with AsyncGarrisonClient(server.address, key_file=server.server.config.data_dir / "admin.key") as root:
            tenants = len((await root.admin.list_tenants()).tenants)
        return "".join(pieces), models, code, tenants

    text, models, code, tenants = asyncio.run(main())
    assert "Paris" in text and models == [MODEL]
    assert code == grpc.StatusCode.PERMISSION_DENIED and tenants >= 1


# -- every RPC, every field ---------------------------------------------------------------------------------------

NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
RPCS = [(service, method) for file in (admin_pb2.DESCRIPTOR, pb.DESCRIPTOR)
        for service in file.services_by_name.values() for method in service.methods]
FIELD = FieldDescriptor


def texts(huge: bool = True) -> st.SearchStrategy[str]:
    """Empty, short, unusual and (`huge`) huge strings, and names this server knows."""
    short = st.one_of(st.just(""), st.text(max_size=12), st.sampled_from([MODEL, "default", "t-fuzz", "gk_00000000"]))
    return st.one_of(short, st.builds(lambda c, n: c * n, st.characters(), st.sampled_from([300, 20_000]))) \
        if huge else short


def numbers(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type == FIELD.TYPE_BOOL:
        return st.booleans()
    if field.type in (FIELD.TYPE_FLOAT, FIELD.TYPE_DOUBLE):
        return st.floats(width=32 if field.type == FIELD.TYPE_FLOAT else 64)
    unsigned = field.type in (FIELD.TYPE_UINT32, FIELD.TYPE_UINT64, FIELD.TYPE_FIXED32, FIELD.TYPE_FIXED64)
    bits = 64 if field.type in (FIELD.TYPE_INT64, FIELD.TYPE_UINT64, FIELD.TYPE_SINT64, FIELD.TYPE_FIXED64,
                                FIELD.TYPE_SFIXED64) else 32
    low, high = (0, 2**bits - 1) if unsigned else (-2**(bits - 1), 2**(bits - 1) - 1)
    return st.one_of(st.sampled_from([low, high, 0, 1, 2]), st.integers(low, high))


def field_values(field: FieldDescriptor, depth: int, huge: bool = True) -> st.SearchStrategy:
    if field.type == FIELD.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            return st.builds(Timestamp, seconds=st.sampled_from([0, -2**63, 2**63 - 1, -62_135_596_801,
                                                                 253_402_300_800, 1_700_000_000]),
                             nanos=st.sampled_from([0, -1, 10**9, 2**31 - 1]))
        return messages_of(field.message_type, depth + 1)
    if field.type == FIELD.TYPE_ENUM:
        return st.integers(-2**31, 2**31 - 1)  # unknown values too
    return texts(huge) if field.type == FIELD.TYPE_STRING else numbers(field)


def messages_of(descriptor, depth: int = 0) -> st.SearchStrategy:
    """Messages of `descriptor` with any subset of fields set to extreme values; repeated fields empty, short, or
    enormous (one value repeated 5 000 times)."""
    fields = {}
    for field in descriptor.fields:
        if depth > 2 and field.type == FIELD.TYPE_MESSAGE:
            continue
        value = field_values(field, depth)
        if field.is_repeated:  # enormous: many short values (a request stays within the server's size limit or not)
            value = st.one_of(st.lists(value, max_size=3),
                              st.builds(lambda v, n: [v] * n, field_values(field, depth, huge=False), st.just(5_000)))
        fields[field.name] = st.one_of(st.none(), value)
    cls = message_factory.GetMessageClass(descriptor)

    def build(values: dict) -> Message:
        message = cls()
        for name, value in values.items():
            if value is None:
                continue
            target = getattr(message, name)
            if descriptor.fields_by_name[name].is_repeated:
                target.extend(value)
            elif descriptor.fields_by_name[name].type == FIELD.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(fields).map(build)


def call_raw(channel, method, payload: bytes, key: str | None) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = bearer(key) if key else ()
    if method.server_streaming:
        for _ in channel.unary_stream(path)(payload, metadata=metadata, timeout=60):
            pass
    else:
        channel.unary_unary(path)(payload, metadata=metadata, timeout=60)


@pytest.fixture(scope="module")
def fuzz_keys(admin, fuzz_key: str, server) -> dict[str, str | None]:
    admin_key = (server.server.config.data_dir / "admin.key").read_text().strip()
    return {"admin": admin_key, "tenant": fuzz_key, "none": None, "bad": "gk_00000000_" + "B" * 43}


@pytest.mark.parametrize("method", [m for _, m in RPCS], ids=[f"{s.name}.{m.name}" for s, m in RPCS])
def test_every_rpc_and_field_fuzzed_never_gets_internal_errors(channel, fuzz_keys, method) -> None:
    """Extreme and malformed values in every field of every RPC, with each kind of key: a precise status, never
    INTERNAL or UNKNOWN. Admin calls run with the admin key mostly, so that they reach the tenancy store."""
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=messages_of(method.input_type),
           key=st.sampled_from(["admin"] * 4 + ["tenant"] * 4 + ["none", "bad"]))
    def check(request: Message, key: str) -> None:
        try:
            call_raw(channel, method, request.SerializeToString(), fuzz_keys[key])
        except grpc.RpcError as err:
            assert err.code() not in NEVER, (err.code(), err.details())

    check()


@pytest.mark.parametrize("method", [m for _, m in RPCS], ids=[f"{s.name}.{m.name}" for s, m in RPCS])
def test_every_rpc_fuzzed_with_raw_bytes_never_gets_internal_errors(channel, fuzz_keys, method) -> None:
    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
    @given(payload=st.binary(max_size=120), key=st.sampled_from(["admin", "tenant"]))
    def check(payload: bytes, key: str) -> None:
        try:
            call_raw(channel, method, payload, fuzz_keys[key])
        except grpc.RpcError as err:
            assert err.code() not in NEVER, (err.code(), err.details())

    check()


def test_the_server_still_serves_after_everything_above(channel, admin, server) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "garrison.v1.Inference", "garrison.v1.Admin"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    _, key = new_tenant(admin)
    assert "Paris" in "".join(p.text for p in generate(channel, key, pb.GenerateRequest(
        model=MODEL, messages=PROMPT, max_tokens=12)))
    wait_until_idle(server)
