package workers

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// Freed slots go round the waiting tenants in turn: a tenant that queued
// many requests first does not make another tenant wait for all of them.
func TestLanesTakeTurns(t *testing.T) {
	var wg sync.WaitGroup
	l := newLanes("test", 2, 2, 10, &wg)
	started := make(chan string, 20)
	gate := make(chan struct{})
	job := func(name string) job {
		return job{
			serve:    func() { started <- name; <-gate },
			refuse:   func(d string) { t.Errorf("%s refused: %s", name, d) },
			received: time.Now(),
		}
	}
	for i := range 6 {
		l.submit("a", job(fmt.Sprintf("a%d", i)))
	}
	l.submit("b", job("b0"))
	<-started
	<-started // a0 and a1 hold both slots; a2…a5 and b0 wait
	var order []string
	for range 5 {
		gate <- struct{}{} // one request finishes: the next in turn starts
		order = append(order, <-started)
	}
	gate <- struct{}{}
	gate <- struct{}{}
	l.close()
	wg.Wait()
	if order[0] != "a2" || order[1] != "b0" {
		t.Errorf("start order after the first two %v, want a2 then b0 (turns), then a's others", order)
	}
}

// Beyond its waiting places a tenant is refused at once, and a closed
// lanes refuses everything.
func TestLanesRefuse(t *testing.T) {
	var wg sync.WaitGroup
	l := newLanes("test", 4, 1, 1, &wg)
	gate := make(chan struct{})
	var refused []string
	var mu sync.Mutex
	job := func(name string) job {
		return job{
			serve:    func() { <-gate },
			refuse:   func(d string) { mu.Lock(); refused = append(refused, name+": "+d); mu.Unlock() },
			received: time.Now(),
		}
	}
	l.submit("a", job("a0")) // served
	l.submit("a", job("a1")) // waits
	l.submit("a", job("a2")) // refused
	l.submit("b", job("b0")) // served
	l.close()
	l.submit("c", job("c0")) // refused: closed
	close(gate)
	wg.Wait()
	if len(refused) != 2 || refused[0][:2] != "a2" || refused[1][:2] != "c0" {
		t.Errorf("refused %q, want a2 (beyond its places) and c0 (closed)", refused)
	}
}
