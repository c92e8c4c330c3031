// Command loadgen replays the Kubernetes API server's etcd request shapes
// against one etcd v3 endpoint with the real etcd Go client (clientv3), phase
// by phase, and writes throughput and latency per phase as JSON.
//
// Phases, in order (see shared/spec/kubernetes-etcd-usage.md for the shapes):
//
//	create  Txn{[MOD(k) == 0], [Put(k, v)], []} for every object
//	get     Range{k, limit:1}
//	update  GuaranteedUpdate: Get, then Txn{[MOD(k) == rev], [Put], [Range(k)]},
//	        retried with the Range's kv on conflict; clients share hot keys
//	list    paginated list: limit 500, next key = last key + "\x00", same revision
//	        (two results: "list", one op per full list, and "list_page")
//	count   Range{prefix, range_end, count_only:true}
//	watch   a prefix watch with prev_kv from current revision + 1 while clients
//	        update; latency = watcher's receipt - writer's response time
//	delete  Txn{[MOD(k) == rev], [DeleteRange(k)], [Range(k)]} for every object
//
// create and delete run once over the objects; the others run for -phase-seconds.
//
// Usage: loadgen -endpoint 127.0.0.1:2379 -objects 2000 -clients 16 -out result.json
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/ioutil"
	"math/rand"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/clientv3"
)

const (
	prefix     = "/registry/bench/"
	opTimeout  = 10 * time.Second
	maxRetries = 1000
	// How long the watcher may lag behind the last write before the phase gives up on it.
	watchTailTimeout = 60 * time.Second
)

var (
	endpoint     = flag.String("endpoint", "127.0.0.1:2379", "host:port of the etcd v3 endpoint")
	objects      = flag.Int("objects", 2000, "objects created, listed and deleted")
	clients      = flag.Int("clients", 16, "concurrent client goroutines")
	conns        = flag.Int("conns", 2, "clientv3 clients (gRPC connections) the goroutines share")
	valueSize    = flag.Int("value-size", 1024, "bytes per value")
	phaseSeconds = flag.Float64("phase-seconds", 10, "duration of each time-bounded phase (get, update, list, count, watch)")
	pageSize     = flag.Int64("page-size", 500, "list page size (limit)")
	hotKeys      = flag.Int("hot-keys", 0, "keys the update phase's clients share (0: as many as -clients)")
	phasesFlag   = flag.String("phases", "create,get,update,list,count,watch,delete", "phases to run, in this order")
	outPath      = flag.String("out", "", "write the JSON result here (default: stdout)")
	caFile       = flag.String("cacert", "", "TLS: CA to verify the server with (TLS is off without it)")
	certFile     = flag.String("cert", "", "TLS: client certificate")
	keyFile      = flag.String("key", "", "TLS: client key")
)

// Result is one row of the output: one phase (or one view of a phase) on one endpoint.
type Result struct {
	Name       string                 `json:"name"`
	Ops        int64                  `json:"ops"`
	Seconds    float64                `json:"seconds"`
	OpsPerSec  float64                `json:"ops_per_sec"`
	P50Ms      float64                `json:"p50_ms"`
	P99Ms      float64                `json:"p99_ms"`
	MeanMs     float64                `json:"mean_ms"`
	MaxMs      float64                `json:"max_ms"`
	Errors     int64                  `json:"errors"`
	FirstError string                 `json:"first_error,omitempty"`
	CPUSeconds float64                `json:"client_cpu_seconds"`
	Extra      map[string]interface{} `json:"extra,omitempty"`
}

// Output is the whole JSON document.
type Output struct {
	Endpoint     string   `json:"endpoint"`
	Objects      int      `json:"objects"`
	Clients      int      `json:"clients"`
	Conns        int      `json:"conns"`
	ValueSize    int      `json:"value_size"`
	PhaseSeconds float64  `json:"phase_seconds"`
	PageSize     int64    `json:"page_size"`
	HotKeys      int      `json:"hot_keys"`
	GoMaxProcs   int      `json:"gomaxprocs"`
	Phases       []Result `json:"phases"`
	WallSeconds  float64  `json:"wall_seconds"`
	CPUSeconds   float64  `json:"client_cpu_seconds"`
}

// recorder collects one goroutine's latencies, errors and counters; merged after the phase.
type recorder struct {
	lat      []time.Duration
	errors   int64
	firstErr string
	counts   map[string]int64
}

func newRecorder() *recorder { return &recorder{counts: map[string]int64{}} }

func (r *recorder) fail(err error) {
	r.errors++
	if r.firstErr == "" {
		r.firstErr = err.Error()
	}
	// A dead server answers at once: do not spin.
	time.Sleep(10 * time.Millisecond)
}

func cpuTime() time.Duration {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		return 0
	}
	return time.Duration(usage.Utime.Nano() + usage.Stime.Nano())
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// summarise merges recorders into one Result.
func summarise(name string, elapsed, cpu time.Duration, recs []*recorder) Result {
	var lat []time.Duration
	res := Result{Name: name, Seconds: elapsed.Seconds(), CPUSeconds: cpu.Seconds(), Extra: map[string]interface{}{}}
	for _, r := range recs {
		lat = append(lat, r.lat...)
		res.Errors += r.errors
		if res.FirstError == "" {
			res.FirstError = r.firstErr
		}
		for k, v := range r.counts {
			if old, ok := res.Extra[k].(int64); ok {
				res.Extra[k] = old + v
			} else {
				res.Extra[k] = v
			}
		}
	}
	fillLatency(&res, lat)
	if res.Seconds > 0 {
		res.OpsPerSec = float64(res.Ops) / res.Seconds
	}
	return res
}

func fillLatency(res *Result, lat []time.Duration) {
	res.Ops = int64(len(lat))
	if len(lat) == 0 {
		return
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	res.P50Ms = ms(percentile(lat, 0.50))
	res.P99Ms = ms(percentile(lat, 0.99))
	res.MeanMs = ms(sum / time.Duration(len(lat)))
	res.MaxMs = ms(lat[len(lat)-1])
}

// percentile of sorted durations, nearest rank.
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(p*float64(len(sorted))+0.999999) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i]
}

type bench struct {
	clis  []*clientv3.Client
	ctx   context.Context
	value string
	seq   int64 // makes every written value differ, as GuaranteedUpdate requires
}

func key(i int) string { return fmt.Sprintf("%sobj-%07d", prefix, i) }

func (b *bench) cli(worker int) *clientv3.Client { return b.clis[worker%len(b.clis)] }

func (b *bench) nextValue() string {
	n := atomic.AddInt64(&b.seq, 1)
	stamp := fmt.Sprintf("{\"seq\":%d}", n)
	if len(stamp) >= len(b.value) {
		return stamp
	}
	return stamp + b.value[len(stamp):]
}

func (b *bench) opCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(b.ctx, opTimeout)
}

// forEachObject runs fn for every object index across -clients goroutines.
func (b *bench) forEachObject(name string, fn func(worker int, rec *recorder, i int)) Result {
	var next int64 = -1
	return b.parallel(name, func(worker int, rec *recorder) {
		for {
			i := int(atomic.AddInt64(&next, 1))
			if i >= *objects {
				return
			}
			fn(worker, rec, i)
		}
	})
}

// forDuration runs fn in a loop on every goroutine until -phase-seconds pass.
func (b *bench) forDuration(name string, fn func(worker int, rec *recorder, rng *rand.Rand)) Result {
	deadline := time.Now().Add(time.Duration(*phaseSeconds * float64(time.Second)))
	return b.parallel(name, func(worker int, rec *recorder) {
		rng := rand.New(rand.NewSource(int64(worker) + 1))
		for time.Now().Before(deadline) {
			fn(worker, rec, rng)
		}
	})
}

func (b *bench) parallel(name string, body func(worker int, rec *recorder)) Result {
	recs := make([]*recorder, *clients)
	var wg sync.WaitGroup
	cpu0, t0 := cpuTime(), time.Now()
	for w := range recs {
		recs[w] = newRecorder()
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			body(w, recs[w])
		}(w)
	}
	wg.Wait()
	return summarise(name, time.Since(t0), cpuTime()-cpu0, recs)
}

func (b *bench) create() Result {
	return b.forEachObject("create", func(w int, rec *recorder, i int) {
		k := key(i)
		ctx, cancel := b.opCtx()
		defer cancel()
		t0 := time.Now()
		resp, err := b.cli(w).Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(k), "=", 0)).
			Then(clientv3.OpPut(k, b.nextValue())).
			Commit()
		if err != nil {
			rec.fail(err)
			return
		}
		rec.lat = append(rec.lat, time.Since(t0))
		if !resp.Succeeded {
			rec.counts["already_exists"]++
		}
	})
}

func (b *bench) get() Result {
	return b.forDuration("get", func(w int, rec *recorder, rng *rand.Rand) {
		ctx, cancel := b.opCtx()
		defer cancel()
		t0 := time.Now()
		resp, err := b.cli(w).Get(ctx, key(rng.Intn(*objects)), clientv3.WithLimit(1))
		if err != nil {
			rec.fail(err)
			return
		}
		rec.lat = append(rec.lat, time.Since(t0))
		if len(resp.Kvs) != 1 {
			rec.counts["missing"]++
		}
	})
}

// guaranteedUpdate is kube-apiserver's read-modify-write of one key: the number of conflicts, or an error.
func (b *bench) guaranteedUpdate(cli *clientv3.Client, k string) (int, int64, error) {
	ctx, cancel := b.opCtx()
	defer cancel()
	got, err := cli.Get(ctx, k, clientv3.WithLimit(1))
	if err != nil {
		return 0, 0, err
	}
	if len(got.Kvs) == 0 {
		return 0, 0, fmt.Errorf("%s: no such key", k)
	}
	rev := got.Kvs[0].ModRevision
	for conflicts := 0; conflicts < maxRetries; conflicts++ {
		resp, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).
			Then(clientv3.OpPut(k, b.nextValue())).
			Else(clientv3.OpGet(k)).
			Commit()
		if err != nil {
			return conflicts, 0, err
		}
		if resp.Succeeded {
			return conflicts, resp.Header.Revision, nil
		}
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 {
			return conflicts, 0, fmt.Errorf("%s: deleted during update", k)
		}
		rev = kvs[0].ModRevision
	}
	return maxRetries, 0, fmt.Errorf("%s: gave up after %d conflicts", k, maxRetries)
}

// sharedKeys is how many keys the update phase's clients pick from.
func sharedKeys() int {
	hot := *hotKeys
	if hot <= 0 {
		hot = *clients
	}
	if hot > *objects {
		hot = *objects
	}
	return hot
}

func (b *bench) update() Result {
	hot := sharedKeys()
	res := b.forDuration("update", func(w int, rec *recorder, rng *rand.Rand) {
		t0 := time.Now()
		conflicts, _, err := b.guaranteedUpdate(b.cli(w), key(rng.Intn(hot)))
		rec.counts["conflicts"] += int64(conflicts)
		if err != nil {
			rec.fail(err)
			return
		}
		rec.lat = append(rec.lat, time.Since(t0))
	})
	res.Extra["hot_keys"] = hot
	return res
}

// listAll pages through the prefix at one revision; it returns the keys' mod revisions,
// the page latencies, and an error for a failed call or an inconsistent answer.
func (b *bench) listAll(cli *clientv3.Client) (map[string]int64, []time.Duration, error) {
	end := clientv3.GetPrefixRangeEnd(prefix)
	start := prefix
	var rev int64
	revs := map[string]int64{}
	var pages []time.Duration
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(*pageSize)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		ctx, cancel := b.opCtx()
		t0 := time.Now()
		resp, err := cli.Get(ctx, start, opts...)
		cancel()
		if err != nil {
			return revs, pages, err
		}
		pages = append(pages, time.Since(t0))
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			revs[string(kv.Key)] = kv.ModRevision
		}
		// Kubernetes 1.32+ reads "more pages" from the count; older versions from `more`.
		if more := int64(len(resp.Kvs)) < resp.Count; more != resp.More {
			return revs, pages, fmt.Errorf("page at %q: more=%v but %d kvs of count %d", start, resp.More, len(resp.Kvs), resp.Count)
		}
		if !resp.More {
			return revs, pages, nil
		}
		if len(resp.Kvs) == 0 {
			return revs, pages, fmt.Errorf("page at %q: more=true with no kvs", start)
		}
		start = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

func (b *bench) list() []Result {
	pageRecs := make([]*recorder, *clients)
	for i := range pageRecs {
		pageRecs[i] = newRecorder()
	}
	res := b.forDuration("list", func(w int, rec *recorder, rng *rand.Rand) {
		t0 := time.Now()
		revs, pages, err := b.listAll(b.cli(w))
		pageRecs[w].lat = append(pageRecs[w].lat, pages...)
		if err != nil {
			rec.fail(err)
			return
		}
		rec.lat = append(rec.lat, time.Since(t0))
		if len(revs) != *objects {
			rec.counts["wrong_total"]++
		}
	})
	pages := summarise("list_page", time.Duration(res.Seconds*float64(time.Second)), 0, pageRecs)
	pages.CPUSeconds = res.CPUSeconds
	res.Extra["pages"] = pages.Ops
	return []Result{res, pages}
}

func (b *bench) count() Result {
	return b.forDuration("count", func(w int, rec *recorder, rng *rand.Rand) {
		ctx, cancel := b.opCtx()
		defer cancel()
		t0 := time.Now()
		resp, err := b.cli(w).Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			rec.fail(err)
			return
		}
		rec.lat = append(rec.lat, time.Since(t0))
		if resp.Count != int64(*objects) || len(resp.Kvs) != 0 {
			rec.counts["wrong_count"]++
		}
	})
}

type receipt struct {
	rev      int64
	at       time.Time
	noPrevKV bool
}

// watch runs one prefix watch while every client updates its own keys (no conflicts).
func (b *bench) watch() []Result {
	revs, _, err := b.listAll(b.clis[0])
	if err != nil {
		return []Result{{Name: "watch", Errors: 1, FirstError: "listing before the watch: " + err.Error()}}
	}
	// The API server's "current revision": Range{key:"/registry/<resource>", limit:1}.
	ctx, cancel := b.opCtx()
	cur, err := b.clis[0].Get(ctx, strings.TrimSuffix(prefix, "/"), clientv3.WithLimit(1))
	cancel()
	if err != nil {
		return []Result{{Name: "watch", Errors: 1, FirstError: "current revision: " + err.Error()}}
	}

	wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(b.ctx))
	defer wcancel()
	events := b.clis[0].Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithPrevKV(), clientv3.WithRev(cur.Header.Revision+1))

	var (
		mu       sync.Mutex
		written  = map[int64]time.Time{} // revision -> writer's response time
		lastRev  int64
		receipts []receipt
		watchErr error
		lastSeen int64
	)
	seen := make(chan struct{}, 1)
	watcherDone := make(chan struct{})
	go func() {
		defer close(watcherDone)
		for resp := range events {
			at := time.Now()
			if err := resp.Err(); err != nil {
				if wctx.Err() == nil {
					watchErr = err
				}
				return
			}
			for _, ev := range resp.Events {
				receipts = append(receipts, receipt{ev.Kv.ModRevision, at, !ev.IsCreate() && ev.PrevKv == nil})
				atomic.StoreInt64(&lastSeen, ev.Kv.ModRevision)
			}
			select {
			case seen <- struct{}{}:
			default:
			}
		}
	}()

	// Writers: worker w owns the keys with index = w (mod clients).
	cpu0, t0 := cpuTime(), time.Now()
	writes := b.forDuration("watch_write", func(w int, rec *recorder, rng *rand.Rand) {
		owned := (*objects - w + *clients - 1) / *clients
		if owned <= 0 {
			time.Sleep(10 * time.Millisecond)
			return
		}
		k := key(w + *clients*rng.Intn(owned))
		mu.Lock()
		rev := revs[k]
		mu.Unlock()
		ctx, cancel := b.opCtx()
		defer cancel()
		start := time.Now()
		resp, err := b.cli(w).Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).
			Then(clientv3.OpPut(k, b.nextValue())).
			Else(clientv3.OpGet(k)).
			Commit()
		now := time.Now()
		if err != nil {
			rec.fail(err)
			return
		}
		rec.lat = append(rec.lat, now.Sub(start))
		mu.Lock()
		defer mu.Unlock()
		if resp.Succeeded {
			revs[k] = resp.Header.Revision
			written[resp.Header.Revision] = now
			if resp.Header.Revision > lastRev {
				lastRev = resp.Header.Revision
			}
		} else {
			rec.counts["conflicts"]++
			if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
				revs[k] = kvs[0].ModRevision
			}
		}
	})

	// Wait for the watcher to catch up with the last write.
	tail := time.Now()
	timeout := time.After(watchTailTimeout)
	caughtUp := true
waiting:
	for atomic.LoadInt64(&lastSeen) < lastRev {
		select {
		case <-seen:
		case <-watcherDone:
			caughtUp = atomic.LoadInt64(&lastSeen) >= lastRev
			break waiting
		case <-timeout:
			caughtUp = false
			break waiting
		}
	}
	tailWait := time.Since(tail)
	wcancel()
	<-watcherDone

	res := Result{Name: "watch", CPUSeconds: (cpuTime() - cpu0).Seconds(), Extra: map[string]interface{}{}}
	var lat []time.Duration
	var last time.Time
	var early, unknown, noPrevKV, outOfOrder int64
	var prev int64
	for _, r := range receipts {
		if r.rev <= prev {
			outOfOrder++
		}
		prev = r.rev
		if r.noPrevKV {
			noPrevKV++
		}
		at, ok := written[r.rev]
		if !ok {
			unknown++
			continue
		}
		d := r.at.Sub(at)
		if d < 0 {
			early++ // the event overtook the writer's own response
			d = 0
		}
		lat = append(lat, d)
		last = r.at
	}
	fillLatency(&res, lat)
	if !last.IsZero() {
		res.Seconds = last.Sub(t0).Seconds()
		res.OpsPerSec = float64(res.Ops) / res.Seconds
	}
	res.Errors = writes.Errors
	res.FirstError = writes.FirstError
	if watchErr != nil {
		res.Errors++
		res.FirstError = "watch: " + watchErr.Error()
	}
	missing := int64(len(written)) - res.Ops
	if !caughtUp || missing != 0 || noPrevKV != 0 || outOfOrder != 0 {
		res.Errors++
		if res.FirstError == "" {
			res.FirstError = fmt.Sprintf("watch: caught up %v, %d events missing, %d without prev_kv, %d out of order",
				caughtUp, missing, noPrevKV, outOfOrder)
		}
	}
	res.Extra["writes"] = len(written)
	res.Extra["missing_events"] = missing
	res.Extra["events_before_write_response"] = early
	res.Extra["unexpected_events"] = unknown
	res.Extra["missing_prev_kv"] = noPrevKV
	res.Extra["out_of_order"] = outOfOrder
	res.Extra["tail_wait_seconds"] = tailWait.Seconds()
	return []Result{res, writes}
}

func (b *bench) delete() Result {
	revs, _, err := b.listAll(b.clis[0])
	if err != nil {
		return Result{Name: "delete", Errors: 1, FirstError: "listing before deletes: " + err.Error()}
	}
	res := b.forEachObject("delete", func(w int, rec *recorder, i int) {
		k := key(i)
		rev := revs[k] // revs is only read from here on
		ctx, cancel := b.opCtx()
		defer cancel()
		t0 := time.Now()
		for attempt := 0; ; attempt++ {
			if attempt == maxRetries {
				rec.fail(fmt.Errorf("%s: gave up after %d conflicts", k, maxRetries))
				return
			}
			resp, err := b.cli(w).Txn(ctx).
				If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).
				Then(clientv3.OpDelete(k)).
				Else(clientv3.OpGet(k)).
				Commit()
			if err != nil {
				rec.fail(err)
				return
			}
			if resp.Succeeded {
				if resp.Responses[0].GetResponseDeleteRange().Deleted != 1 {
					rec.counts["deleted_not_one"]++
				}
				break
			}
			kvs := resp.Responses[0].GetResponseRange().Kvs
			if len(kvs) == 0 {
				rec.counts["already_gone"]++
				break
			}
			rec.counts["conflicts"]++
			rev = kvs[0].ModRevision
		}
		rec.lat = append(rec.lat, time.Since(t0))
	})
	ctx, cancel := b.opCtx()
	defer cancel()
	if left, err := b.clis[0].Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly()); err == nil {
		res.Extra["left"] = left.Count
	}
	return res
}

func main() {
	flag.Parse()
	if *objects <= 0 || *clients <= 0 || *conns <= 0 || *valueSize < 0 || *pageSize <= 0 {
		fmt.Fprintln(os.Stderr, "loadgen: -objects, -clients, -conns and -page-size must be positive")
		os.Exit(2)
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

// clientTLS is nil (plaintext) without -cacert.
func clientTLS() (*tls.Config, error) {
	if *caFile == "" {
		return nil, nil
	}
	pem, err := ioutil.ReadFile(*caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in %s", *caFile)
	}
	config := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if *certFile != "" {
		pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

func run() error {
	cpu0, t0 := cpuTime(), time.Now()
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(context.Background()))
	defer cancel()
	b := &bench{ctx: ctx, value: strings.Repeat("x", *valueSize)}
	tlsConfig, err := clientTLS()
	if err != nil {
		return err
	}
	for i := 0; i < *conns; i++ {
		cli, err := clientv3.New(clientv3.Config{
			Endpoints:            []string{*endpoint},
			DialTimeout:          20 * time.Second,
			DialKeepAliveTime:    30 * time.Second,
			DialKeepAliveTimeout: 10 * time.Second,
			TLS:                  tlsConfig,
		})
		if err != nil {
			return fmt.Errorf("connect to %s: %w", *endpoint, err)
		}
		defer cli.Close()
		b.clis = append(b.clis, cli)
	}

	// Start from an empty prefix.
	dctx, dcancel := b.opCtx()
	_, err = b.clis[0].Delete(dctx, prefix, clientv3.WithPrefix())
	dcancel()
	if err != nil {
		return fmt.Errorf("clearing %s: %w", prefix, err)
	}

	out := Output{
		Endpoint: *endpoint, Objects: *objects, Clients: *clients, Conns: *conns, ValueSize: *valueSize,
		PhaseSeconds: *phaseSeconds, PageSize: *pageSize, HotKeys: sharedKeys(), GoMaxProcs: runtime.GOMAXPROCS(0),
	}
	for _, phase := range strings.Split(*phasesFlag, ",") {
		var results []Result
		switch strings.TrimSpace(phase) {
		case "create":
			results = []Result{b.create()}
		case "get":
			results = []Result{b.get()}
		case "update":
			results = []Result{b.update()}
		case "list":
			results = b.list()
		case "count":
			results = []Result{b.count()}
		case "watch":
			results = b.watch()
		case "delete":
			results = []Result{b.delete()}
		default:
			return errors.New("unknown phase " + phase)
		}
		for _, r := range results {
			fmt.Fprintf(os.Stderr, "loadgen: %-12s %7d ops %8.1f ops/s  p50 %7.2f ms  p99 %7.2f ms  errors %d\n",
				r.Name, r.Ops, r.OpsPerSec, r.P50Ms, r.P99Ms, r.Errors)
		}
		out.Phases = append(out.Phases, results...)
	}
	out.WallSeconds = time.Since(t0).Seconds()
	out.CPUSeconds = (cpuTime() - cpu0).Seconds()

	data, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	data = append(data, '\n')
	if *outPath == "" {
		_, err = os.Stdout.Write(data)
		return err
	}
	return os.WriteFile(*outPath, data, 0o644)
}
