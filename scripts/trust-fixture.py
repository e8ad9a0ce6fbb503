"""The image-trust variant of a load-test review: pushes one small image per image the review
names to the test registry (scripts/start-test-registry.sh; its env file sourced), signs each
with a cosign key made here, and writes

  OUT/review.json   the review with its images moved to the test registry (same tags)
  OUT/trust.yaml    moat's embedded default configuration plus images.trust for them

    python3 scripts/trust-fixture.py MOAT_BINARY REVIEW_JSON OUT
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oci_layout  # noqa: E402
import yaml  # noqa: E402

moat, review_path, out = sys.argv[1:4]
registry = os.environ["MOAT_TEST_REGISTRY"]
cert_dir = os.environ["MOAT_TEST_REGISTRY_CERT_DIR"]
ca = os.environ["MOAT_TEST_REGISTRY_CA"]
env = dict(os.environ, COSIGN_PASSWORD="moat-loadtest", SSL_CERT_FILE=ca)

subprocess.run(["cosign", "generate-key-pair"], cwd=out, env=env, check=True,
               capture_output=True)
review = json.load(open(review_path))
containers = review["request"]["object"]["spec"]["containers"]
for i, c in enumerate(containers):
    name, tag = c["image"].rsplit("/", 1)[-1].split(":", 1)
    ref = f"{registry}/loadtest/{name}:{tag}"
    archive = os.path.join(out, f"{name}.tar")
    oci_layout.write_archive(archive, ref_name=tag, config={}, created=0,
                             created_by="moat loadtest", layer_raw=b"\0" * 1024,
                             arch=oci_layout.goarch(), labels={"moat.loadtest/image": name})
    digest_file = os.path.join(out, f"{name}.digest")
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-cert-dir", cert_dir, "--digestfile",
                    digest_file, f"oci-archive:{archive}", f"docker://{ref}"], check=True)
    digest = open(digest_file).read().strip()
    subprocess.run(["cosign", "sign", "--tlog-upload=false", "--yes", "--key",
                    os.path.join(out, "cosign.key"), f"{registry}/loadtest/{name}@{digest}"],
                   env=env, check=True, capture_output=True)
    c["image"] = ref
json.dump(review, open(os.path.join(out, "review.json"), "w"), separators=(",", ":"))

config = yaml.safe_load(subprocess.run([moat, "config", "default"], capture_output=True,
                                       text=True, check=True).stdout)
config.setdefault("images", {})["trust"] = {
    # The whole run reads a warm cache: what is measured is the cost of a verified review.
    "tagTtlSeconds": 3600,
    "caCertificates": open(ca).read(),
    "rules": [{"repositories": [registry], "keys": [
        {"name": "loadtest", "publicKey": open(os.path.join(out, "cosign.pub")).read()}]}],
}
yaml.safe_dump(config, open(os.path.join(out, "trust.yaml"), "w"), sort_keys=False)
