// tlsprobe connects to one endpoint over TLS with the real etcd Go client
// (clientv3), puts a key and reads it back. It prints "ok" and exits 0, or
// prints the error and exits 1. The TLS tests run it with and without a
// client certificate, with the wrong CA and with expired certificates.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"time"

	"go.etcd.io/etcd/clientv3"
)

func fail(step string, err error) {
	fmt.Printf("%s: %v\n", step, err)
	os.Exit(1)
}

func main() {
	endpoint := flag.String("endpoint", "", "https://host:port")
	caFile := flag.String("cacert", "", "CA to verify the server with")
	certFile := flag.String("cert", "", "client certificate (optional)")
	keyFile := flag.String("key", "", "client key (optional)")
	timeout := flag.Duration("timeout", 3*time.Second, "dial and request timeout")
	flag.Parse()

	roots := x509.NewCertPool()
	pem, err := ioutil.ReadFile(*caFile)
	if err != nil {
		fail("read ca", err)
	}
	if !roots.AppendCertsFromPEM(pem) {
		fail("read ca", fmt.Errorf("no certificate in %s", *caFile))
	}
	config := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if *certFile != "" {
		pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fail("read client certificate", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{*endpoint}, DialTimeout: *timeout, TLS: config})
	if err != nil {
		fail("connect", err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if _, err := cli.Put(ctx, "tls-probe", "go"); err != nil {
		fail("put", err)
	}
	got, err := cli.Get(ctx, "tls-probe")
	if err != nil {
		fail("get", err)
	}
	if len(got.Kvs) != 1 || string(got.Kvs[0].Value) != "go" {
		fail("get", fmt.Errorf("unexpected answer %v", got.Kvs))
	}
	fmt.Println("ok")
}
