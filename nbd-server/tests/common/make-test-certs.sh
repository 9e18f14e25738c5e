#!/bin/sh
# Test certificates for NBD over TLS, in the current directory (EC P-256, valid two days; about 0.5 s): a CA, a
# server certificate for localhost, a client certificate, and a second ("rogue") CA with a client certificate of
# its own; then one directory per party, laid out as nbdkit, qemu and libnbd expect them:
#   server/    ca-cert.pem server-cert.pem server-key.pem     (bf nbd serve --tls-certificates)
#   client/    ca-cert.pem client-cert.pem client-key.pem     (a trusted client)
#   nocert/    ca-cert.pem                                    (a client without a certificate)
#   intruder/  ca-cert.pem + a client certificate of the rogue CA
#   distrust/  the rogue CA as ca-cert.pem + the trusted client certificate (does not trust the server)
# Used by nbd-server/tests/tls.rs and tools/tests/e2e/nbd_tls.rs.
set -e
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() {
  key $1-key.pem
  printf 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n' > $1.ext
  openssl req -new -key $1-key.pem -subj "/CN=$2" -out $1.csr
  openssl x509 -req -in $1.csr -signkey $1-key.pem -days 2 -extfile $1.ext -out $1-cert.pem 2>/dev/null
}
leaf() {
  key $1-key.pem
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n%s\n' "$4" "$5" > $1.ext
  openssl req -new -key $1-key.pem -subj "/CN=$3" -out $1.csr
  openssl x509 -req -in $1.csr -CA $2-cert.pem -CAkey $2-key.pem -CAcreateserial -days 2 -extfile $1.ext \
    -out $1-cert.pem 2>/dev/null
}
ca ca "bf test CA"
ca rogue "rogue CA"
leaf server ca localhost serverAuth "subjectAltName=DNS:localhost,IP:127.0.0.1"
leaf client ca client clientAuth ""
leaf intruder rogue client clientAuth ""
mkdir server client nocert intruder distrust
cp ca-cert.pem server-cert.pem server-key.pem server/
cp ca-cert.pem client-cert.pem client-key.pem client/
cp ca-cert.pem nocert/
cp ca-cert.pem intruder/ && cp intruder-cert.pem intruder/client-cert.pem && cp intruder-key.pem intruder/client-key.pem
cp rogue-cert.pem distrust/ca-cert.pem && cp client-cert.pem client-key.pem distrust/
