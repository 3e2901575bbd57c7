// Learning-rate schedules, as a function of the 0-based step s of a run of S steps:
//   warmup (every kind):  s < W:  lr = max_lr * (s + 1) / W
//   cosine:   lr = min + (max - min) * (1 + cos(pi * p)) / 2,  p = (s - W) / (S - W)
//   linear:   lr = max - (max - min) * p
//   wsd:      warmup, then max_lr until the last D = round(decay_fraction * S) steps, then
//             linear from max to min over those D steps: p = (s - (S - D)) / D
//   constant: max_lr after warmup
// with min = max_lr * final_fraction. p is clamped to [0, 1].
#pragma once
#include <string>

#include "core/json.hpp"

namespace qopt {

enum class ScheduleKind { Cosine, Linear, Wsd, Constant };

struct LrSchedule {
    ScheduleKind kind = ScheduleKind::Cosine;
    double max_lr = 1e-3;
    long warmup_steps = 0;
    long total_steps = 1;
    double final_fraction = 0.1;
    double decay_fraction = 0.2;  // wsd only

    double at(long step) const;
    void validate() const;
    Json to_json() const;
};

ScheduleKind parse_schedule(const std::string& name);
const char* schedule_name(ScheduleKind kind);

}  // namespace qopt
