// Command watchprobe drives the real etcd Go client (clientv3, as used by
// kube-apiserver) against one endpoint through a scripted scenario and prints
// one JSON object per observation on stdout. It normalises nothing: the
// Python test runs it against real etcd and pykine and compares the lines.
//
// Usage: watchprobe -endpoint 127.0.0.1:2379 -scenario progress
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/etcdserver/api/v3rpc/rpctypes"
	"go.etcd.io/etcd/etcdserver/etcdserverpb"
	"go.etcd.io/etcd/mvcc/mvccpb"
	"google.golang.org/grpc/metadata"
)

const (
	// Each step waits at most this long; the whole run is bounded by deadline.
	stepTimeout = 5 * time.Second
	deadline    = 20 * time.Second
)

type obj = map[string]interface{}

var out = json.NewEncoder(os.Stdout)

// emit prints one observation: its step name plus the given fields.
func emit(step string, fields obj) {
	fields["step"] = step
	if err := out.Encode(fields); err != nil {
		fmt.Fprintln(os.Stderr, "watchprobe: cannot write:", err)
		os.Exit(2)
	}
}

// fail reports an unexpected client error and stops the scenario.
func fail(step string, err error) {
	emit(step, obj{"fatal": err.Error()})
	os.Exit(1)
}

func header(h *etcdserverpb.ResponseHeader) obj {
	if h == nil {
		return nil
	}
	return obj{"cluster_id": h.ClusterId, "member_id": h.MemberId, "revision": h.Revision, "raft_term": h.RaftTerm}
}

func keyValue(kv *mvccpb.KeyValue) obj {
	if kv == nil {
		return nil
	}
	return obj{
		"key":             string(kv.Key),
		"value":           string(kv.Value),
		"create_revision": kv.CreateRevision,
		"mod_revision":    kv.ModRevision,
		"version":         kv.Version,
		"lease":           kv.Lease,
	}
}

func event(ev *clientv3.Event) obj {
	return obj{
		"type":        ev.Type.String(),
		"is_create":   ev.IsCreate(),
		"is_modify":   ev.IsModify(),
		"kv":          keyValue(ev.Kv),
		"has_prev_kv": ev.PrevKv != nil,
		"prev_kv":     keyValue(ev.PrevKv),
	}
}

func errorFields(err error) obj {
	if err == nil {
		return obj{"err": nil, "err_is_compacted": false, "err_is_future_rev": false}
	}
	return obj{
		"err":               err.Error(),
		"err_is_compacted":  err == rpctypes.ErrCompacted,
		"err_is_future_rev": err == rpctypes.ErrFutureRev,
	}
}

func response(wr clientv3.WatchResponse) obj {
	events := []obj{}
	for _, ev := range wr.Events {
		events = append(events, event(ev))
	}
	fields := obj{
		"header":             header(&wr.Header),
		"events":             events,
		"compact_revision":   wr.CompactRevision,
		"canceled":           wr.Canceled,
		"created":            wr.Created,
		"is_progress_notify": wr.IsProgressNotify(),
	}
	for name, value := range errorFields(wr.Err()) {
		fields[name] = value
	}
	return fields
}

// receive takes one response from a watch channel and reports it, or that the
// channel closed, or that nothing came in time. It returns the number of
// events received, or -1 if nothing was received.
func receive(step, watch string, ch clientv3.WatchChan) int {
	select {
	case wr, ok := <-ch:
		if !ok {
			emit(step, obj{"watch": watch, "closed": true})
			return -1
		}
		emit(step, obj{"watch": watch, "response": response(wr)})
		return len(wr.Events)
	case <-time.After(stepTimeout):
		emit(step, obj{"watch": watch, "timeout": true})
		return -1
	}
}

// receiveEvents reports responses until n events have arrived (or a few
// responses more than that, or a failure).
func receiveEvents(step, watch string, ch clientv3.WatchChan, n int) {
	got := 0
	for tries := 0; got < n && tries < n+3; tries++ {
		count := receive(step, watch, ch)
		if count < 0 {
			return
		}
		got += count
	}
}

func opContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), stepTimeout)
}

func revision(cli *clientv3.Client, step string) int64 {
	ctx, cancel := opContext()
	defer cancel()
	resp, err := cli.Get(ctx, "/registry/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		fail(step, err)
	}
	emit(step, obj{"header": header(resp.Header), "count": resp.Count})
	return resp.Header.Revision
}

func put(cli *clientv3.Client, key, value string) int64 {
	ctx, cancel := opContext()
	defer cancel()
	resp, err := cli.Put(ctx, key, value)
	if err != nil {
		fail("put "+key, err)
	}
	emit("put", obj{"key": key, "value": value, "header": header(resp.Header)})
	return resp.Header.Revision
}

// txn runs a kube-apiserver style conditional write: if the key's
// mod_revision is rev then op, else read the key back.
func txn(cli *clientv3.Client, key string, rev int64, op clientv3.Op) int64 {
	ctx, cancel := opContext()
	defer cancel()
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
		Then(op).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		fail("txn "+key, err)
	}
	emit("txn", obj{"key": key, "if_mod_revision": rev, "succeeded": resp.Succeeded, "header": header(resp.Header)})
	return resp.Header.Revision
}

func deletePrefix(cli *clientv3.Client, prefix string) {
	ctx, cancel := opContext()
	defer cancel()
	resp, err := cli.Delete(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		fail("delete "+prefix, err)
	}
	emit("delete", obj{"prefix": prefix, "deleted": resp.Deleted, "header": header(resp.Header)})
}

func requestProgress(cli *clientv3.Client, ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, stepTimeout)
	defer cancel()
	if err := cli.RequestProgress(rctx); err != nil {
		fail("request progress", err)
	}
	emit("request progress", obj{})
}

// progress: two watches on one gRPC stream (same ctx, as kube-apiserver's
// watch cache does per resource), then RequestProgress, whose reply (watch id
// -1) the client broadcasts to every watch of the stream.
func progress(cli *clientv3.Client) {
	ctx := clientv3.WithRequireLeader(context.Background())
	current := revision(cli, "get")
	opts := []clientv3.OpOption{
		clientv3.WithPrefix(), clientv3.WithPrevKV(), clientv3.WithProgressNotify(), clientv3.WithRev(current + 1),
	}
	wa := cli.Watch(ctx, "/registry/a/", opts...)
	wb := cli.Watch(ctx, "/registry/b/", opts...)

	txn(cli, "/registry/a/one", 0, clientv3.OpPut("/registry/a/one", "v1"))
	put(cli, "/registry/b/one", "v1")
	two := put(cli, "/registry/a/two", "v1")
	put(cli, "/registry/b/two", "v1")
	put(cli, "/registry/a/one", "v2")
	txn(cli, "/registry/b/one", current+2, clientv3.OpPut("/registry/b/one", "v2"))
	txn(cli, "/registry/b/one", current+2, clientv3.OpPut("/registry/b/one", "stale")) // fails: no event
	txn(cli, "/registry/a/two", two, clientv3.OpDelete("/registry/a/two"))
	deletePrefix(cli, "/registry/b/") // two keys, one revision, one response
	put(cli, "/registry/c/unwatched", "v1")

	receiveEvents("events", "a", wa, 4)
	receiveEvents("events", "b", wb, 5)
	revision(cli, "get before progress")
	requestProgress(cli, ctx)
	receive("progress", "a", wa)
	receive("progress", "b", wb)

	// The watches go on after a progress notification.
	put(cli, "/registry/a/three", "v1")
	receive("after progress", "a", wa)
}

// compacted: kube-apiserver's 410 Gone path. A watch (or a read) at a
// compacted revision fails with ErrCompacted and the compact revision.
func compacted(cli *clientv3.Client) {
	ctx := clientv3.WithRequireLeader(context.Background())
	revision(cli, "get")
	first := put(cli, "/registry/c/k", "v1")
	put(cli, "/registry/c/k", "v2")
	compactAt := put(cli, "/registry/c/k", "v3")
	put(cli, "/registry/c/other", "v1")

	// kube-apiserver's compactor: record the compact revision, then compact.
	func() {
		octx, cancel := opContext()
		defer cancel()
		resp, err := cli.Txn(octx).
			If(clientv3.Compare(clientv3.Version("compact_rev_key"), "=", 0)).
			Then(clientv3.OpPut("compact_rev_key", strconv.FormatInt(compactAt, 10))).
			Else(clientv3.OpGet("compact_rev_key")).
			Commit()
		if err != nil {
			fail("compact txn", err)
		}
		emit("compact txn", obj{"succeeded": resp.Succeeded, "header": header(resp.Header)})
	}()
	for _, rev := range []int64{compactAt, compactAt - 1, 1000} {
		octx, cancel := opContext()
		resp, err := cli.Compact(octx, rev)
		cancel()
		fields := errorFields(err)
		fields["revision"] = rev
		if resp != nil {
			fields["header"] = header(resp.Header)
		}
		emit("compact", fields)
	}

	for _, rev := range []int64{first, compactAt} {
		octx, cancel := opContext()
		resp, err := cli.Get(octx, "/registry/c/", clientv3.WithPrefix(), clientv3.WithRev(rev))
		cancel()
		fields := errorFields(err)
		fields["revision"] = rev
		if resp != nil {
			kvs := []obj{}
			for _, kv := range resp.Kvs {
				kvs = append(kvs, keyValue(kv))
			}
			fields["header"] = header(resp.Header)
			fields["kvs"] = kvs
		}
		emit("get at revision", fields)
	}

	old := cli.Watch(ctx, "/registry/c/", clientv3.WithPrefix(), clientv3.WithPrevKV(), clientv3.WithRev(first))
	receive("watch compacted", "old", old)
	receive("watch compacted", "old", old) // the channel closes after the error

	// Changes after the compaction, then watches that start at exactly the
	// compact revision: allowed, they catch up from history in one batch.
	// kube-apiserver always asks for prev_kv; the previous value of the
	// event at the compact revision itself lies below the compact revision.
	put(cli, "/registry/c/k", "v4")
	func() {
		octx, cancel := opContext()
		defer cancel()
		resp, err := cli.Delete(octx, "/registry/c/other")
		if err != nil {
			fail("delete", err)
		}
		emit("delete", obj{"deleted": resp.Deleted, "header": header(resp.Header)})
	}()
	at := cli.Watch(ctx, "/registry/c/", clientv3.WithPrefix(), clientv3.WithRev(compactAt))
	receiveEvents("watch at compact revision", "at", at, 4)
	atPrev := cli.Watch(ctx, "/registry/c/", clientv3.WithPrefix(), clientv3.WithPrevKV(), clientv3.WithRev(compactAt))
	receiveEvents("watch at compact revision", "at-prev-kv", atPrev, 4)
}

// streams: watches whose contexts carry different metadata use separate gRPC
// streams; a progress request answers only the watches of its own stream.
// Deletes carry prev_kv, which kube-apiserver decodes the deleted object from.
func streams(cli *clientv3.Client) {
	plain := clientv3.WithRequireLeader(context.Background())
	cache := metadata.AppendToOutgoingContext(clientv3.WithRequireLeader(context.Background()), "source", "cache")
	current := revision(cli, "get")
	opts := []clientv3.OpOption{
		clientv3.WithPrefix(), clientv3.WithPrevKV(), clientv3.WithProgressNotify(), clientv3.WithRev(current + 1),
	}
	w1 := cli.Watch(plain, "/registry/pods/", opts...)
	w2 := cli.Watch(cache, "/registry/pods/", opts...)
	wc := cli.Watch(cache, "/registry/pods/", clientv3.WithPrefix(), clientv3.WithCreatedNotify())
	// Read the created notification at once: the client blocks the stream until it is taken.
	receive("created notify", "cache-created", wc)

	created := txn(cli, "/registry/pods/default/p1", 0, clientv3.OpPut("/registry/pods/default/p1", `{"v":1}`))
	updated := txn(cli, "/registry/pods/default/p1", created, clientv3.OpPut("/registry/pods/default/p1", `{"v":2}`))
	txn(cli, "/registry/pods/default/p1", updated, clientv3.OpDelete("/registry/pods/default/p1"))

	receiveEvents("events", "plain", w1, 3)
	receiveEvents("events", "cache", w2, 3)
	receiveEvents("events", "cache-created", wc, 3)

	revision(cli, "get before progress")
	requestProgress(cli, plain)
	receive("progress", "plain", w1)
	put(cli, "/registry/pods/default/p2", `{"v":1}`)
	receive("after progress", "plain", w1)
	receive("after progress", "cache", w2) // the event, not a progress notification
	receive("after progress", "cache-created", wc)
}

// periodic: with a short progress-notify interval on the server, a watch
// that asked for progress notifications gets one (for its id only); another
// watch on the same stream does not.
func periodic(cli *clientv3.Client) {
	ctx := clientv3.WithRequireLeader(context.Background())
	put(cli, "/registry/a/old", "v1")
	current := revision(cli, "get")
	wa := cli.Watch(ctx, "/registry/a/", clientv3.WithPrefix(), clientv3.WithProgressNotify(), clientv3.WithRev(current+1))
	wb := cli.Watch(ctx, "/registry/b/", clientv3.WithPrefix(), clientv3.WithRev(current+1))
	receive("periodic progress", "a", wa)
	put(cli, "/registry/b/new", "v1")
	receive("after periodic progress", "b", wb) // the event, not a progress notification
}

// keepalive: with client keepalive on (grpc-go sends a PING after 10 s
// without traffic and drops the connection if no ACK comes within the
// timeout), a watch that stays quiet past several pings still works.
func keepalive(cli *clientv3.Client) {
	ctx := clientv3.WithRequireLeader(context.Background())
	current := revision(cli, "get")
	w := cli.Watch(ctx, "/registry/quiet/", clientv3.WithPrefix(), clientv3.WithRev(current+1))
	time.Sleep(keepaliveTime + keepaliveTime/2)
	put(cli, "/registry/quiet/k", "v1")
	receive("after pings", "quiet", w)
}

// The shortest keepalive interval grpc-go allows a client.
const keepaliveTime = 10 * time.Second

func main() {
	endpoint := flag.String("endpoint", "127.0.0.1:2379", "etcd endpoint host:port")
	scenario := flag.String("scenario", "progress", "progress, compacted, streams, periodic or keepalive")
	flag.Parse()
	scenarios := map[string]func(*clientv3.Client){
		"progress":  progress,
		"compacted": compacted,
		"streams":   streams,
		"periodic":  periodic,
		"keepalive": keepalive,
	}
	run, ok := scenarios[*scenario]
	if !ok {
		fmt.Fprintln(os.Stderr, "watchprobe: unknown scenario", *scenario)
		os.Exit(2)
	}
	time.AfterFunc(deadline, func() {
		emit("deadline", obj{"fatal": fmt.Sprintf("scenario did not finish within %s", deadline)})
		os.Exit(3)
	})
	config := clientv3.Config{Endpoints: []string{*endpoint}, DialTimeout: stepTimeout}
	if *scenario == "keepalive" {
		config.DialKeepAliveTime = keepaliveTime
		config.DialKeepAliveTimeout = 2 * time.Second
	}
	cli, err := clientv3.New(config)
	if err != nil {
		fail("connect", err)
	}
	run(cli)
	if err := cli.Close(); err != nil && err != context.Canceled {
		fail("close", err)
	}
	emit("done", obj{})
}
