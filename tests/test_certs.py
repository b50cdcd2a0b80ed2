"""``gateway certs`` (gateway/exchange/certs.py, gateway/cli/certs.py): a local CA, member
certificates that name their member, CRLs; checked with ``cryptography`` as a reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.cli import main
from gateway.exchange.mtls import fingerprint_of, member_names

LEGACY = "330000:legacy-records"


def test_a_member_certificate_names_its_member_and_the_cli_prints_its_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`certs issue --member` puts urn:gw:member:<id> in the SAN URI, the key is 0600, and
    the printed config lines pin the certificate's real fingerprint."""
    assert main(["certs", "ca", "--out", str(tmp_path / "ca")]) == 0
    capsys.readouterr()
    stem = str(tmp_path / "m")
    assert main(["certs", "issue", "--ca", str(tmp_path / "ca"), "--member", LEGACY,
                 "--out", stem]) == 0  # fmt: skip
    out = capsys.readouterr().out
    cert = x509.load_pem_x509_certificate((tmp_path / "m.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:gw:member:{LEGACY}"]
    assert member_names(cert) == (LEGACY,)
    fp = fingerprint_of(cert.public_bytes(Encoding.DER))
    assert f'certificates: ["{fp}"]' in out
    assert "auth: [mtls]" in out
    assert (tmp_path / "m.key").stat().st_mode & 0o077 == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)


def test_revoke_accumulates_serials_in_a_crl_the_ca_signed(tmp_path: Path) -> None:
    """Two `certs revoke` runs leave one CRL with both serials, signed by the CA."""
    ca = str(tmp_path / "ca")
    assert main(["certs", "ca", "--out", ca]) == 0
    for name in ("a", "b"):
        assert main(["certs", "issue", "--ca", ca, "--member", f"330000:{name}",
                     "--out", str(tmp_path / name)]) == 0  # fmt: skip
    crl_path = tmp_path / "ca.crl"
    for name in ("a", "b"):
        assert main(["certs", "revoke", "--ca", ca, "--crl", str(crl_path),
                     str(tmp_path / f"{name}.crt")]) == 0  # fmt: skip
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    issuer = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    assert crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    serials = {r.serial_number for r in crl}
    for name in ("a", "b"):
        cert = x509.load_pem_x509_certificate((tmp_path / f"{name}.crt").read_bytes())
        assert cert.serial_number in serials


def test_a_certificate_of_another_ca_cannot_be_revoked_here(tmp_path: Path) -> None:
    """`certs revoke` refuses a certificate the CA did not issue (exit 2, no CRL written)."""
    for ca in ("ca", "other"):
        assert main(["certs", "ca", "--out", str(tmp_path / ca)]) == 0
    assert main(["certs", "issue", "--ca", str(tmp_path / "other"), "--member", LEGACY,
                 "--out", str(tmp_path / "x")]) == 0  # fmt: skip
    code = main(["certs", "revoke", "--ca", str(tmp_path / "ca"), "--crl",
                 str(tmp_path / "ca.crl"), str(tmp_path / "x.crt")])  # fmt: skip
    assert code != 0
    assert not (tmp_path / "ca.crl").exists()
