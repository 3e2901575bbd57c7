#include "optim/schedule.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"

namespace qopt {

ScheduleKind parse_schedule(const std::string& name) {
    if (name == "cosine") return ScheduleKind::Cosine;
    if (name == "linear") return ScheduleKind::Linear;
    if (name == "wsd") return ScheduleKind::Wsd;
    if (name == "constant") return ScheduleKind::Constant;
    fail("unknown schedule '", name, "' (known: cosine, linear, wsd, constant)");
}

const char* schedule_name(ScheduleKind kind) {
    switch (kind) {
        case ScheduleKind::Cosine: return "cosine";
        case ScheduleKind::Linear: return "linear";
        case ScheduleKind::Wsd: return "wsd";
        case ScheduleKind::Constant: return "constant";
    }
    return "?";
}

void LrSchedule::validate() const {
    QOPT_CHECK(max_lr > 0 && std::isfinite(max_lr), "--lr must be positive, got ", max_lr);
    QOPT_CHECK(total_steps > 0, "the number of steps must be positive, got ", total_steps);
    QOPT_CHECK(warmup_steps >= 0 && warmup_steps <= total_steps, "--warmup-steps must be in 0..", total_steps,
               ", got ", warmup_steps);
    QOPT_CHECK(final_fraction >= 0 && final_fraction <= 1, "--lr-final-fraction must be in [0, 1], got ",
               final_fraction);
    QOPT_CHECK(decay_fraction > 0 && decay_fraction <= 1, "--wsd-decay-fraction must be in (0, 1], got ",
               decay_fraction);
}

double LrSchedule::at(long step) const {
    if (step < warmup_steps) return max_lr * double(step + 1) / double(warmup_steps);
    const double min_lr = max_lr * final_fraction;
    auto clamp01 = [](double p) { return std::min(1.0, std::max(0.0, p)); };
    const long decay_span = total_steps - warmup_steps;
    const double progress = decay_span > 0 ? clamp01(double(step - warmup_steps) / double(decay_span)) : 1.0;
    switch (kind) {
        case ScheduleKind::Cosine: return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * progress));
        case ScheduleKind::Linear: return max_lr - (max_lr - min_lr) * progress;
        case ScheduleKind::Constant: return max_lr;
        case ScheduleKind::Wsd: {
            const long decay_steps = std::max(1L, std::lround(decay_fraction * double(total_steps)));
            const long decay_start = total_steps - decay_steps;
            if (step < decay_start) return max_lr;
            return max_lr - (max_lr - min_lr) * clamp01(double(step - decay_start) / double(decay_steps));
        }
    }
    return max_lr;
}

Json LrSchedule::to_json() const {
    Json json = Json::object();
    json["kind"] = schedule_name(kind);
    json["max_lr"] = max_lr;
    json["warmup_steps"] = int64_t(warmup_steps);
    json["total_steps"] = int64_t(total_steps);
    json["final_fraction"] = final_fraction;
    json["decay_fraction"] = decay_fraction;
    return json;
}

}  // namespace qopt
