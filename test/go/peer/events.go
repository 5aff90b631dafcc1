package peer

import (
	"encoding/json"
	"os"
	"sync"
	"time"
)

var eventMu sync.Mutex

// Event prints one JSON line {"event": name, "time": ..., fields...} on stdout.
func Event(name string, fields map[string]interface{}) {
	m := map[string]interface{}{"event": name, "time": time.Now().UTC().Format(time.RFC3339Nano)}
	for k, v := range fields {
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		b = []byte(`{"event":"error","what":"event encoding"}`)
	}
	eventMu.Lock()
	defer eventMu.Unlock()
	os.Stdout.Write(append(b, '\n'))
}
