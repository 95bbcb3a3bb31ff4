"""The instance roles' policy (terraform/iam.tf), evaluated by the real Terraform (`terraform console`, offline, in a
scratch module with test ARNs in place of resources), then judged the way IAM judges a request: an explicit Deny wins,
then any Allow, else the request is denied.

AmazonSSMManagedInstanceCore is attached to every role and allows ssm:GetParameter and ssm:GetParameters on every
parameter, so it takes part in every judgement: the attack of issue 10 (a compromised worker reads the gateway's TLS
key: its role could call GetParameter on any parameter, and kms:Decrypt the stack key through SSM) must be refused
even so, and so must a worker reading the other worker role's token (a compromised infer VM connecting as a caller
and binding the API's triggers, or a caller serving inference)."""
import json
import re

import pytest

from deploylib import Terraform, terraform_console, terraform_exe

REGION = "us-east-1"
ACCOUNT = "111122223333"
NAME = "meshd"
KMS_KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/11111111-2222-3333-4444-555555555555"
BUCKET_ARN = "arn:aws:s3:::meshd-artifacts-test"
BINARY_ARN = f"{BUCKET_ARN}/meshd/{'ab' * 32}/meshd"
MODEL_ARN = f"{BUCKET_ARN}/models/{'cd' * 32}/model.gguf"
LOG_GROUP_ARN = {g: f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/{NAME}/{g}" for g in ("journal", "metrics")}
SSM = f"ssm.{REGION}.amazonaws.com"
S3 = f"s3.{REGION}.amazonaws.com"


def parameter_arn(name: str) -> str:
    return f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{name}"


WORKER_ROLES = ("caller", "infer")
TOKEN = {role: parameter_arn(f"/{NAME}/worker-token/{role}") for role in WORKER_ROLES}

# What each role may read, and nothing more (the security claim of docs/DEPLOY.md): a worker role its own role's
# token, the gateway every role's token, the API keys and its TLS key.
OWN = {
    "gateway": {TOKEN["caller"], TOKEN["infer"], parameter_arn(f"/{NAME}/api-keys"),
                parameter_arn(f"/{NAME}/gateway-tls-key"), parameter_arn(f"/{NAME}/state-password"),
                parameter_arn(f"/{NAME}/metrics-key")},
    "caller": {TOKEN["caller"]},
    "infer": {TOKEN["infer"]},
}
# Someone else's secret in the same account and region.
FOREIGN = parameter_arn("/payroll/db-password")
# The single worker token of an older deployment (it granted every role), should it still exist: nobody reads it.
LEGACY_TOKEN = parameter_arn(f"/{NAME}/worker-token")

# The SSM part of the AWS managed policy AmazonSSMManagedInstanceCore (its other statements are ssmmessages:* and
# ec2messages:*, which touch neither parameters nor keys).
MANAGED_INSTANCE_CORE = {
    "Version": "2012-10-17",
    "Statement": [{
        "Effect": "Allow",
        "Action": ["ssm:DescribeAssociation", "ssm:GetDeployablePatchSnapshotForInstance", "ssm:GetDocument",
                   "ssm:DescribeDocument", "ssm:GetManifest", "ssm:GetParameter", "ssm:GetParameters",
                   "ssm:ListAssociations", "ssm:ListInstanceAssociations", "ssm:PutInventory",
                   "ssm:PutComplianceItems", "ssm:PutConfigurePackageResult", "ssm:UpdateAssociationStatus",
                   "ssm:UpdateInstanceAssociationStatus", "ssm:UpdateInstanceInformation"],
        "Resource": "*",
    }],
}


# ---- the policy as Terraform renders it -------------------------------------------------------------------------------


def _substitute(expr: str) -> str:
    """References to resources, variables and each.* -> the scratch module's locals (anything else stays, and
    Terraform then refuses the undeclared reference: the test must learn about it). A for_each parameter's instance
    aws_ssm_parameter.x["k"].arn (its quotes JSON-escaped or not) -> local.ssm_arn.x.k (no quotes: the expression sits
    inside a JSON-encoded string)."""
    expr = re.sub(r'\baws_ssm_parameter\.([a-z0-9_]+)\[\\?"([a-z][a-z0-9_]*)\\?"\]\.arn\b', r"local.ssm_arn.\1.\2", expr)
    expr = re.sub(r"\baws_ssm_parameter\.([a-z0-9_]+)\.arn\b", r"local.ssm_arn.\1", expr)
    expr = expr.replace("aws_kms_key.meshd.arn", "local.kms_key_arn")
    expr = expr.replace("aws_s3_bucket.artifacts.arn", "local.bucket_arn")
    expr = re.sub(r"\baws_cloudwatch_log_group\.([a-z0-9_]+)\.arn\b", r"local.log_group_arn.\1", expr)
    expr = expr.replace("var.region", "local.region")
    expr = re.sub(r"\beach\.value\b", "v", expr)
    expr = re.sub(r"\beach\.key\b", "k", expr)
    return expr


def _inner(value: str) -> str:
    assert value.startswith("${") and value.endswith("}"), value
    return value[2:-1]


@pytest.fixture(scope="module")
def policies(tf: Terraform, tmp_path_factory):
    """{use_binary_url: {role: policy document}} as `terraform console` renders aws_iam_role_policy.node.policy."""
    exe = terraform_exe()
    assert exe, "terraform is not installed (scripts/deploy-checks provides one)"
    body = tf.resources["aws_iam_role_policy"]["node"]
    assert body["for_each"] == "${local.node_roles}"
    ssm_arn = {}
    for name, r in tf.resources["aws_ssm_parameter"].items():
        path = r["name"].replace("${var.name}", NAME)
        if "for_each" in r:  # one parameter per key: {key: arn}
            m = re.fullmatch(r"\$\{toset\(local\.([a-z_0-9]+)\)\}", r["for_each"])
            assert m, f"aws_ssm_parameter.{name}: for_each {r['for_each']!r} is not toset(local.x)"
            ssm_arn[name] = {k: parameter_arn(path.replace("${each.key}", k)) for k in tf.locals[m.group(1)]}
        else:
            ssm_arn[name] = parameter_arn(path)
    assert ssm_arn["worker_token"] == TOKEN, ssm_arn
    roles = _substitute(json.dumps(tf.locals["node_roles"]))
    policy = _substitute(_inner(body["policy"]))
    out = {}
    for use_url in (False, True):
        mod = tmp_path_factory.mktemp("iam")
        (mod / "main.tf").write_text(
            "locals {\n"
            f"  region             = {json.dumps(REGION)}\n"
            f"  kms_key_arn        = {json.dumps(KMS_KEY_ARN)}\n"
            f"  bucket_arn         = {json.dumps(BUCKET_ARN)}\n"
            f"  ssm_arn            = {json.dumps(ssm_arn)}\n"
            f"  use_binary_url     = {json.dumps(use_url)}\n"
            f"  binary_object_arns = {json.dumps([] if use_url else [BINARY_ARN])}\n"
            f"  model_object_arn   = {json.dumps(MODEL_ARN)}\n"
            f"  infer_gpu          = false\n"
            f"  log_group_arn      = {json.dumps(LOG_GROUP_ARN)}\n"
            f"  node_roles         = {roles}\n"
            f"  policies           = {{ for k, v in local.node_roles : k => {policy} }}\n"
            "}\n"
        )
        printed, err = terraform_console(exe, mod, "jsonencode(local.policies)")
        assert err is None, f"{err}\n{(mod / 'main.tf').read_text()}"
        out[use_url] = {role: json.loads(doc) for role, doc in json.loads(json.loads(printed)).items()}
    assert set(out[False]) == set(OWN), "one policy per instance role"
    return out


# ---- a small IAM evaluator (the parts these policies use; anything else fails loudly) ---------------------------------


def _list(value):
    return value if isinstance(value, list) else [value]


def _glob(pattern: str, value: str, ignore_case=False) -> bool:
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.IGNORECASE if ignore_case else 0) is not None


def _condition_holds(condition: dict, context: dict) -> bool:
    for op, tests in condition.items():
        for key, wanted in tests.items():
            wanted = _list(wanted)
            present = key in context
            value = context.get(key)
            if op == "StringEquals":
                ok = present and value in wanted
            elif op == "StringNotEquals":  # true when the key is absent or matches none of the values
                ok = not present or value not in wanted
            elif op in ("StringLike", "ArnLike", "ArnEquals"):
                ok = present and any(_glob(w, value) for w in wanted)
            else:
                raise AssertionError(f"condition operator {op} is not modelled by this test")
            if not ok:
                return False
    return True


def _applies(st: dict, action: str, resource: str, context: dict) -> bool:
    unknown = set(st) - {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource", "Condition"}
    assert not unknown, f"statement elements not modelled: {unknown}"
    if "Action" in st and not any(_glob(a, action, ignore_case=True) for a in _list(st["Action"])):
        return False
    if "NotAction" in st and any(_glob(a, action, ignore_case=True) for a in _list(st["NotAction"])):
        return False
    if "Resource" in st and not any(_glob(r, resource) for r in _list(st["Resource"])):
        return False
    if "NotResource" in st and any(_glob(r, resource) for r in _list(st["NotResource"])):
        return False
    return _condition_holds(st.get("Condition", {}), context)


def decide(docs, action, resource, context=None) -> str:
    """"Allow", "ExplicitDeny" or "ImplicitDeny" for one request against the role's policies."""
    context = context or {}
    hits = [st["Effect"] for doc in docs for st in doc["Statement"] if _applies(st, action, resource, context)]
    if "Deny" in hits:
        return "ExplicitDeny"
    return "Allow" if "Allow" in hits else "ImplicitDeny"


def role_docs(policies, role, use_url=False):
    return [policies[use_url][role], MANAGED_INSTANCE_CORE]


def via_ssm(parameter):
    """The context of the kms:Decrypt that Parameter Store makes for GetParameter --with-decryption."""
    return {"kms:ViaService": SSM, "kms:EncryptionContext:PARAMETER_ARN": parameter}


ALL_PARAMETERS = sorted(OWN["gateway"] | {FOREIGN, LEGACY_TOKEN})


# ---- the tests --------------------------------------------------------------------------------------------------------


def test_every_role_has_the_deny_and_the_encryption_context_condition(policies):
    for use_url, by_role in policies.items():
        for role, doc in by_role.items():
            own = sorted(OWN[role])
            st = {s["Sid"]: s for s in doc["Statement"]}
            deny = st["DenyOtherParameters"]
            assert deny["Effect"] == "Deny" and deny["Action"] == ["ssm:GetParameter*"]
            assert sorted(deny["NotResource"]) == own and "Resource" not in deny
            allow = st["DecryptOwnParametersViaSsm"]
            assert allow["Effect"] == "Allow" and allow["Resource"] == [KMS_KEY_ARN]
            assert allow["Condition"]["StringEquals"]["kms:ViaService"] == [SSM]
            assert sorted(allow["Condition"]["StringEquals"]["kms:EncryptionContext:PARAMETER_ARN"]) == own
            kms_deny = st["DenyDecryptOfOtherParameters"]
            assert kms_deny["Effect"] == "Deny" and kms_deny["Resource"] == [KMS_KEY_ARN]
            assert kms_deny["Condition"]["StringEquals"] == {"kms:ViaService": [SSM]}
            assert sorted(kms_deny["Condition"]["StringNotEquals"]["kms:EncryptionContext:PARAMETER_ARN"]) == own
            # Nothing else may decrypt with the stack key: every kms:Decrypt Allow is bound to a service and a context.
            for s in doc["Statement"]:
                if s["Effect"] == "Allow" and "kms:Decrypt" in s["Action"]:
                    keys = set(s["Condition"]["StringEquals"])
                    assert "kms:ViaService" in keys and any(k.startswith("kms:EncryptionContext:") for k in keys), s


@pytest.mark.parametrize("role", sorted(OWN))
@pytest.mark.parametrize("parameter", ALL_PARAMETERS, ids=lambda arn: arn.split(":parameter", 1)[1])
def test_a_role_reads_and_decrypts_its_own_parameters_only(policies, role, parameter):
    docs = role_docs(policies, role)
    own = parameter in OWN[role]
    for action in ("ssm:GetParameter", "ssm:GetParameters"):
        assert decide(docs, action, parameter) == ("Allow" if own else "ExplicitDeny"), action
    assert decide(docs, "ssm:GetParameterHistory", parameter) == ("ImplicitDeny" if own else "ExplicitDeny")
    assert decide(docs, "kms:Decrypt", KMS_KEY_ARN, via_ssm(parameter)) == ("Allow" if own else "ExplicitDeny")


@pytest.mark.parametrize("role", WORKER_ROLES)
def test_a_worker_cannot_read_the_gateway_tls_key_or_the_api_keys(policies, role):
    """Issue 10, exactly: a worker's role with AmazonSSMManagedInstanceCore attached."""
    docs = role_docs(policies, role)
    for name in ("gateway-tls-key", "api-keys"):
        arn = parameter_arn(f"/{NAME}/{name}")
        assert decide(docs, "ssm:GetParameter", arn) == "ExplicitDeny"
        assert decide(docs, "ssm:GetParameters", arn) == "ExplicitDeny"
        assert decide(docs, "kms:Decrypt", KMS_KEY_ARN, via_ssm(arn)) == "ExplicitDeny"


@pytest.mark.parametrize("role,other", [("caller", "infer"), ("infer", "caller")])
def test_a_worker_reads_its_own_roles_token_and_never_the_other_roles(policies, role, other):
    """Each token grants only its role (the gateway's grants): the caller's VM must not get the infer token (serve
    inference::*), nor an infer VM the caller token (bind POST /v1/chat/completions and the other API triggers)."""
    for use_url in (False, True):
        docs = role_docs(policies, role, use_url)
        for action in ("ssm:GetParameter", "ssm:GetParameters"):
            assert decide(docs, action, TOKEN[role]) == "Allow", (role, action)
            assert decide(docs, action, TOKEN[other]) == "ExplicitDeny", (role, action)
        assert decide(docs, "kms:Decrypt", KMS_KEY_ARN, via_ssm(TOKEN[role])) == "Allow"
        assert decide(docs, "kms:Decrypt", KMS_KEY_ARN, via_ssm(TOKEN[other])) == "ExplicitDeny"
        # Nor by path: /meshd/worker-token/ holds both.
        assert decide(docs, "ssm:GetParametersByPath", parameter_arn(f"/{NAME}/worker-token")) == "ExplicitDeny"


def test_only_the_gateway_reads_every_roles_token(policies):
    readers = {arn: {role for role in OWN if decide(role_docs(policies, role), "ssm:GetParameter", arn) == "Allow"
                     and decide(role_docs(policies, role), "kms:Decrypt", KMS_KEY_ARN, via_ssm(arn)) == "Allow"}
               for arn in TOKEN.values()}
    assert readers == {TOKEN["caller"]: {"gateway", "caller"}, TOKEN["infer"]: {"gateway", "infer"}}
    # The single token of an older deployment, which granted every role: no role reads it, not even the gateway.
    for role in OWN:
        assert decide(role_docs(policies, role), "ssm:GetParameter", LEGACY_TOKEN) == "ExplicitDeny", role


@pytest.mark.parametrize("role", sorted(OWN))
def test_no_listing_and_no_decrypt_outside_ssm_or_without_a_context(policies, role):
    docs = role_docs(policies, role)
    for path in (parameter_arn(f"/{NAME}"), parameter_arn("/")):
        assert decide(docs, "ssm:GetParametersByPath", path) == "ExplicitDeny"
    # A ciphertext taken elsewhere, decrypted directly or through SSM without a parameter's context: refused.
    assert decide(docs, "kms:Decrypt", KMS_KEY_ARN) == "ImplicitDeny"
    assert decide(docs, "kms:Decrypt", KMS_KEY_ARN, {"kms:ViaService": SSM}) == "ExplicitDeny"
    mine = sorted(OWN[role])[0]
    assert decide(docs, "kms:Decrypt", KMS_KEY_ARN, {"kms:EncryptionContext:PARAMETER_ARN": mine}) == "ImplicitDeny"


@pytest.mark.parametrize("role", sorted(OWN))
def test_the_binary_through_s3_only_from_the_artifact_bucket(policies, role):
    docs = role_docs(policies, role)
    assert decide(docs, "s3:GetObject", BINARY_ARN) == "Allow"
    assert decide(docs, "s3:GetObject", f"{BUCKET_ARN}/something-else") == "ImplicitDeny"
    for ctx in (BUCKET_ARN, BINARY_ARN):  # with an S3 Bucket Key the context is the bucket, without it the object
        assert decide(docs, "kms:Decrypt", KMS_KEY_ARN, {"kms:ViaService": S3, "kms:EncryptionContext:aws:s3:arn": ctx}) == "Allow"
    other = {"kms:ViaService": S3, "kms:EncryptionContext:aws:s3:arn": "arn:aws:s3:::someone-elses-bucket"}
    assert decide(docs, "kms:Decrypt", KMS_KEY_ARN, other) == "ImplicitDeny"
    # With meshd_binary_url the binary comes over HTTPS: no S3 read of it.
    url_docs = role_docs(policies, role, use_url=True)
    assert decide(url_docs, "s3:GetObject", BINARY_ARN) == "ImplicitDeny"
    ctx = {"kms:ViaService": S3, "kms:EncryptionContext:aws:s3:arn": BUCKET_ARN}
    # ... and no decrypt through S3 at all, unless the role still reads an object (infer: the model).
    assert decide(url_docs, "kms:Decrypt", KMS_KEY_ARN, ctx) == ("Allow" if role == "infer" else "ImplicitDeny")
    # The parameters are unaffected by where the binary comes from.
    for parameter in ALL_PARAMETERS:
        assert decide(url_docs, "ssm:GetParameter", parameter) == decide(docs, "ssm:GetParameter", parameter)


@pytest.mark.parametrize("role", sorted(OWN))
def test_only_infer_reads_the_model(policies, role):
    for use_url in (False, True):
        docs = role_docs(policies, role, use_url)
        assert decide(docs, "s3:GetObject", MODEL_ARN) == ("Allow" if role == "infer" else "ImplicitDeny"), use_url
    # Nor any other object of the bucket, such as another model.
    assert decide(role_docs(policies, role), "s3:GetObject", f"{BUCKET_ARN}/models/{'ef' * 32}/model.gguf") == "ImplicitDeny"


@pytest.mark.parametrize("role", sorted(OWN))
def test_logs_only_into_the_roles_own_groups(policies, role):
    docs = role_docs(policies, role)
    own = {"journal"} | ({"metrics"} if role == "gateway" else set())
    for group, arn in LOG_GROUP_ARN.items():
        stream = f"{arn}:log-stream:i-0123456789abcdef0"
        want = "Allow" if group in own else "ImplicitDeny"
        assert decide(docs, "logs:PutLogEvents", stream) == want, group
        assert decide(docs, "logs:CreateLogStream", stream) == want, group
    assert decide(docs, "logs:PutLogEvents", f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/payroll:log-stream:x") == "ImplicitDeny"
    assert decide(docs, "logs:CreateLogGroup", LOG_GROUP_ARN["journal"]) == "ImplicitDeny"


@pytest.mark.parametrize("role", WORKER_ROLES)
def test_the_evaluator_sees_the_attack_without_the_denies(policies, role):
    """The judgement above is meaningful: with the two Deny statements taken out (the policy before issue 10, plus
    its SSM-wide decrypt), AmazonSSMManagedInstanceCore lets a worker read the gateway's TLS key and the other
    worker role's token."""
    doc = json.loads(json.dumps(policies[False][role]))
    doc["Statement"] = [s for s in doc["Statement"] if s["Effect"] != "Deny"]
    for s in doc["Statement"]:
        if s["Sid"] == "DecryptOwnParametersViaSsm":
            del s["Condition"]["StringEquals"]["kms:EncryptionContext:PARAMETER_ARN"]
    other_token = next(TOKEN[r] for r in WORKER_ROLES if r != role)
    for arn in (parameter_arn(f"/{NAME}/gateway-tls-key"), other_token):
        assert decide([doc, MANAGED_INSTANCE_CORE], "ssm:GetParameter", arn) == "Allow", arn
        assert decide([doc, MANAGED_INSTANCE_CORE], "kms:Decrypt", KMS_KEY_ARN, via_ssm(arn)) == "Allow", arn
