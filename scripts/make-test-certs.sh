#!/usr/bin/env bash
# Make a throw-away test CA, a server certificate for the node and a client certificate,
# for DICOM TLS tests and trials. NOT for production: keys are unencrypted.
# Usage: scripts/make-test-certs.sh OUT_DIR [SERVER_HOST]
set -euo pipefail
out=${1:?usage: make-test-certs.sh OUT_DIR [SERVER_HOST]}
host=${2:-localhost}
mkdir -p "$out"
cd "$out"
days=30
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days $days \
  -subj "/CN=cxr-node test CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
make_cert() {  # name cn ext
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" \
    -days $days -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
make_cert server "$host" "subjectAltName=DNS:$host,DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
make_cert client "cxr-node test client" "extendedKeyUsage=clientAuth"
# a client certificate from another CA: must be refused
openssl req -x509 -newkey rsa:2048 -nodes -keyout rogue.key -out rogue.pem -days $days \
  -subj "/CN=rogue client" 2>/dev/null
chmod 600 ./*.key
echo "test CA and certificates written to $out (ca.pem, server.pem/key, client.pem/key)"
