"""Certificates for the TLS tests, made with openssl as an admin would (README): a CA, the PACS's and
mkiso's certificates it issued, another CA with a PACS certificate of its own, and an expired
certificate of mkiso's."""

import os
import subprocess


def _openssl(*args):
    subprocess.run(["openssl"] + list(args), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Pki:
    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.ca = self.authority("ca", "mkiso test CA")
        self.other_ca = self.authority("other-ca", "another CA")
        self.pacs = self.issue("pacs", "PACS", self.ca)
        self.mkiso = self.issue("mkiso", "mkiso", self.ca, days=400)
        self.soon = self.issue("soon", "mkiso", self.ca, days=10, key=self.mkiso[1])  # renew it!
        self.syslog = self.issue("syslog", "127.0.0.1", self.ca, alt="IP:127.0.0.1")
        self.stranger = self.issue("stranger", "PACS", self.other_ca)  # a PACS whose CA we do not trust
        self.expired = self.issue("expired", "mkiso", self.ca, days=-1, key=self.mkiso[1])

    def path(self, name):
        return os.path.join(self.folder, name)

    def authority(self, name, subject):
        """(certificate, key) of a self-signed CA."""
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.path(name + ".key"),
                 "-out", self.path(name + ".crt"), "-days", "3650", "-subj", "/CN=" + subject)
        return self.path(name + ".crt"), self.path(name + ".key")

    def issue(self, name, subject, authority, days=30, key=None, alt=None):
        """(certificate, key) issued by ``authority`` for ``days`` (negative: expired already)."""
        key = key or self.path(name + ".key")
        if not os.path.exists(key):
            _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key)
        _openssl("req", "-new", "-key", key, "-out", self.path(name + ".csr"), "-subj", "/CN=" + subject)
        extensions = []
        if alt:
            with open(self.path(name + ".ext"), "w", encoding="ascii") as handle:
                handle.write("subjectAltName = %s\n" % alt)
            extensions = ["-extfile", self.path(name + ".ext")]
        _openssl("x509", "-req", "-in", self.path(name + ".csr"), "-CA", authority[0], "-CAkey", authority[1],
                 "-CAcreateserial", "-out", self.path(name + ".crt"), "-days", str(days), *extensions)
        return self.path(name + ".crt"), key

    def setting(self, pair=None, ca=None, **more):
        """A tls: mapping for the config with ``pair`` (default mkiso's) and ``ca`` (default our CA)."""
        certificate, key = pair or self.mkiso
        return dict({"enabled": True, "certificate": certificate, "private_key": key,
                     "ca_file": ca or self.ca[0]}, **more)
